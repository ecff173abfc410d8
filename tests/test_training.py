"""The shared training loop: seeded batches, checkpoints and exact resume."""
import pytest
import torch
from peft import get_peft_model

from utils.forward import label_logits
from utils.losses import ce_per_sample
from utils.models import lora_config
from tests.tiny import tiny_llama
from utils.training import TrainConfig, epoch_batches, train


def features(n=20):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(5, 60, (6 + i % 4,), generator=g).tolist()
        out.append({"input_ids": ids, "label_ids": ids[-1:], "label": i % 2, "is_forget": i % 5 == 0})
    return out


def make_model():
    torch.manual_seed(1)
    return get_peft_model(tiny_llama(64, seed=0), lora_config(dropout=0.1, target_modules=["q_proj", "v_proj"]))


def loss_fn(model, batch):
    loss = ce_per_sample(label_logits(model, batch), batch["label_ids"]).mean()
    return loss, {}


class Interrupt(Exception):
    pass


def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_epoch_batches_seeded_and_complete():
    a = epoch_batches(10, 3, seed=1, epoch=0)
    assert a == epoch_batches(10, 3, seed=1, epoch=0) and a != epoch_batches(10, 3, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(10)) and [len(b) for b in a] == [3, 3, 3, 1]


def test_length_grouped_batches():
    lengths = [3, 9, 1, 7, 5, 8, 2, 6, 4, 10, 11, 12]
    plain = epoch_batches(12, 2, seed=4, epoch=0)
    assert epoch_batches(12, 2, seed=4, epoch=0, lengths=lengths, group=0) == plain  # group 0: unchanged
    a = epoch_batches(12, 2, seed=4, epoch=0, lengths=lengths, group=3)
    assert a == epoch_batches(12, 2, seed=4, epoch=0, lengths=lengths, group=3)
    assert a != epoch_batches(12, 2, seed=4, epoch=1, lengths=lengths, group=3)
    assert sorted(i for b in a for i in b) == list(range(12)) and all(len(b) == 2 for b in a)
    # each megabatch of 3 batches (6 consecutive indices of the shuffle) is sorted, longest first
    perm = [i for b in plain for i in b]
    for s in range(0, 12, 6):
        chunk = sorted(perm[s : s + 6], key=lambda i: -lengths[i])
        assert {tuple(chunk[k : k + 2]) for k in range(0, 6, 2)} <= {tuple(b) for b in a}

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    # one megabatch for the epoch: batches pair neighbours of the sorted lengths, (12, 11), (10, 9), ...
    whole = epoch_batches(12, 2, seed=4, epoch=0, lengths=lengths, group=6)
    assert padded(whole) == sum(sorted(lengths)[1::2]) * 2 == 84 and padded(whole) < padded(plain)


def test_train_uses_length_grouped_batches():
    feats = features(20)  # lengths 6..9, five of each
    seen = []

    def record(model, batch):
        seen.append(sorted(batch["num_tokens"].tolist()))
        return loss_fn(model, batch)

    model = make_model()
    train(model, model.parameters(), record, feats, TrainConfig(lr=1e-3, num_epochs=1, batch_size=4, group_by_length=5), "cpu", 0)
    lengths = [len(f["input_ids"]) for f in feats]
    assert seen == [sorted(lengths[i] for i in b) for b in epoch_batches(20, 4, 42, 0, lengths, 5)]
    assert all(max(b) - min(b) <= 1 for b in seen)  # one megabatch: each batch spans at most two lengths


def test_resume_after_interrupt_is_exact(tmp_path):
    cfg = dict(lr=1e-2, num_epochs=2, batch_size=4, warmup_ratio=0.1, seed=3)  # 10 steps
    feats = features()

    torch.manual_seed(5)
    ref_model = make_model()
    stats = train(ref_model, ref_model.parameters(), loss_fn, feats, TrainConfig(**cfg), "cpu", 0)
    assert stats.steps == 10

    torch.manual_seed(5)
    model = make_model()
    calls = {"n": 0}

    def dying(m, b):
        calls["n"] += 1
        if calls["n"] == 8:  # killed during step 8; the last checkpoint is after step 6
            raise Interrupt
        return loss_fn(m, b)

    ck = TrainConfig(**cfg, checkpoint_dir=str(tmp_path / "ck"), save_every=3)
    with pytest.raises(Interrupt):
        train(model, model.parameters(), dying, feats, ck, "cpu", 0)
    assert (tmp_path / "ck" / "last" / "state.json").is_file()
    assert sorted(p.name for p in (tmp_path / "ck" / "last").iterdir()) == ["optimizer.safetensors", "state.json", "trainable.safetensors"]

    torch.manual_seed(123)  # a new process: fresh model, different global RNG
    resumed = make_model()
    ck_resume = TrainConfig(**cfg, checkpoint_dir=str(tmp_path / "ck"), save_every=3, resume=True)
    stats2 = train(resumed, resumed.parameters(), loss_fn, feats, ck_resume, "cpu", 0)
    assert stats2.steps == 10
    want, got = lora_weights(ref_model), lora_weights(resumed)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    # the checkpoint (after step 6) fell inside epoch 2: its running sums came back with it
    assert len(stats2.epoch_means) == 2 and stats2.epoch_means == stats.epoch_means


def test_epoch_means_are_the_means_of_every_step():
    feats = features()  # 20 samples, batch 4: 5 steps an epoch; 2.4 epochs: 12 steps, the last epoch 2 of them

    def halves(m, b):
        loss, _ = loss_fn(m, b)
        return loss, {"half": loss.item() / 2, "note": "ignored"}

    model = make_model()
    stats = train(model, model.parameters(), halves, feats, TrainConfig(lr=1e-2, num_epochs=2.4, batch_size=4, seed=3, log_every=1), "cpu", 0)
    losses = [loss for _, loss, _ in stats.losses]
    assert len(losses) == 12 and len(stats.epoch_means) == 3
    for e, (lo, hi) in enumerate([(0, 5), (5, 10), (10, 12)]):
        want = sum(losses[lo:hi]) / (hi - lo)
        assert stats.epoch_means[e]["loss"] == pytest.approx(want, rel=1e-12)
        assert stats.epoch_means[e]["half"] == pytest.approx(want / 2, rel=1e-12)
        assert set(stats.epoch_means[e]) == {"loss", "half"}
    assert "epoch_sums" not in stats.as_dict() and stats.as_dict()["epoch_means"] == stats.epoch_means


def test_train_stats_record_by_hand():
    from utils.training import TrainStats

    s = TrainStats()
    s.record(3.0, {"L_f": 2.0, "L_r": 1.0})
    s.record(1.0, {"L_f": 0.0, "L_r": 1.0})
    s.end_epoch()
    s.end_epoch()  # an epoch without steps adds nothing
    s.record(5.0, {"L_f": 4.0})
    s.end_epoch()
    assert s.epoch_means == [{"loss": 2.0, "L_f": 1.0, "L_r": 1.0}, {"loss": 5.0, "L_f": 4.0}]


def test_non_finite_loss_stops():
    from utils.training import TrainingDiverged

    model = make_model()
    with pytest.raises(TrainingDiverged, match="non-finite loss"):
        train(model, model.parameters(), lambda m, b: (torch.tensor(float("nan"), requires_grad=True), {}),
              features(8), TrainConfig(lr=1e-3, num_epochs=1, batch_size=4), "cpu", 0)


def test_stratified_batches_hold_the_same_share_of_forget_samples():
    from utils.training import epoch_batches

    strata = [True] * 64 + [False] * 128  # the CPU profile's SPUL training set
    for epoch in range(3):
        batches = epoch_batches(192, 8, seed=1, epoch=epoch, strata=strata)
        assert sorted(i for b in batches for i in b) == list(range(192))  # a permutation
        counts = [sum(strata[i] for i in b) for b in batches]
        assert set(counts) <= {2, 3, 4} and sum(counts) == 64  # 8/3 per batch, within two
        # a plain shuffle spreads them far more unevenly
    plain = [sum(strata[i] for i in b) for b in epoch_batches(192, 8, seed=1, epoch=0)]
    assert max(plain) - min(plain) > 2
    assert epoch_batches(192, 8, 1, 0, strata=strata) == epoch_batches(192, 8, 1, 0, strata=strata)
    assert epoch_batches(192, 8, 1, 0, strata=strata) != epoch_batches(192, 8, 2, 0, strata=strata)


def test_weight_average_by_hand():
    from utils.training import WeightAverage

    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    avg = WeightAverage({"w": w}, decay=0.5)
    with torch.no_grad():
        w.copy_(torch.tensor([3.0, 4.0]))
    avg.update(1)  # rate min(0.5, 2/11): the start fades out fast
    assert torch.allclose(avg.avg["w"], torch.tensor([29 / 11, 40 / 11]))
    with torch.no_grad():
        w.copy_(torch.tensor([5.0, 6.0]))
    avg.update(2)  # rate min(0.5, 3/12) = 0.25
    assert torch.allclose(avg.avg["w"], torch.tensor([0.25 * 29 / 11 + 3.75, 0.25 * 40 / 11 + 4.5]))
    assert avg.rate(100) == 0.5  # the decay caps the warmed-up rate
    avg.copy_to()
    assert torch.allclose(w.detach(), torch.tensor([0.25 * 29 / 11 + 3.75, 0.25 * 40 / 11 + 4.5]))


def test_ema_run_returns_the_average_of_the_plain_run_weights():
    cfg = dict(lr=1e-2, num_epochs=1, batch_size=5, seed=3)  # 4 steps
    feats = features()
    seen = []

    def recording(m, b):  # called at the start of each step: the weights the step starts from
        seen.append(lora_weights(m))
        return loss_fn(m, b)

    torch.manual_seed(5)
    plain = make_model()
    stats = train(plain, plain.parameters(), recording, feats, TrainConfig(**cfg), "cpu", 0)
    trajectory = seen + [lora_weights(plain)]  # w_0 .. w_4
    assert stats.steps == 4 and stats.ema_decay == 0.0

    torch.manual_seed(5)
    averaged = make_model()
    ema_stats = train(averaged, averaged.parameters(), loss_fn, feats, TrainConfig(**cfg, ema_decay=0.3), "cpu", 0)
    assert [l[1] for l in ema_stats.losses] == [l[1] for l in stats.losses]  # same trajectory
    want = {n: t.float().clone() for n, t in trajectory[0].items()}
    for t in range(1, 5):
        r = min(0.3, (1 + t) / (10 + t))
        want = {n: r * want[n] + (1 - r) * trajectory[t][n] for n in want}
    got = lora_weights(averaged)
    assert ema_stats.ema_decay == 0.3
    assert all(torch.allclose(got[n], want[n], atol=1e-7) for n in want)
    assert any(not torch.allclose(got[n], trajectory[4][n]) for n in want)  # not the last weights


def test_resume_with_a_weight_average_is_exact(tmp_path):
    cfg = dict(lr=1e-2, num_epochs=2, batch_size=4, warmup_ratio=0.1, seed=3, ema_decay=0.6)  # 10 steps
    feats = features()
    torch.manual_seed(5)
    ref_model = make_model()
    train(ref_model, ref_model.parameters(), loss_fn, feats, TrainConfig(**cfg), "cpu", 0)

    torch.manual_seed(5)
    model = make_model()
    calls = {"n": 0}

    def dying(m, b):
        calls["n"] += 1
        if calls["n"] == 8:
            raise Interrupt
        return loss_fn(m, b)

    ck = dict(checkpoint_dir=str(tmp_path / "ck"), save_every=3)
    with pytest.raises(Interrupt):
        train(model, model.parameters(), dying, feats, TrainConfig(**cfg, **ck), "cpu", 0)
    torch.manual_seed(123)
    resumed = make_model()
    train(resumed, resumed.parameters(), loss_fn, feats, TrainConfig(**cfg, **ck, resume=True), "cpu", 0)
    want, got = lora_weights(ref_model), lora_weights(resumed)
    assert all(torch.equal(want[k], got[k]) for k in want)
