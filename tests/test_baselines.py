"""Unlearning baselines: each loss on hand-built tensors, the reference store and the
adapter-off reference on a tiny model, one tiny end-to-end run per method
(qlora.py -> baselines.py -> inference_spul.py), divergence and bad input."""
import json
import math

import pandas as pd
import pytest
import torch

import baselines
import inference_spul
import qlora
from tests.conftest import write_splits
from utils.baselines import (
    METHODS,
    AdapterOffReference,
    FullDist,
    Method,
    RefBatch,
    TopKDist,
    Weights,
    build_reference_store,
    coarse_kl,
    make_loss_fn,
    method_weights,
    npo_per_sample,
    simnpo_per_sample,
    select_features,
)
from utils.template import IGNORE

# ---------------------------------------------------------------------------------------------
# losses on hand-built tensors
# ---------------------------------------------------------------------------------------------


def _batch(label_ids, is_forget):
    return {"label_ids": torch.tensor(label_ids), "is_forget": torch.tensor(is_forget)}


def _ce(logits, y):
    return -math.log(math.exp(logits[y]) / sum(math.exp(z) for z in logits))


def test_registry_lists_the_five_methods_and_their_samples():
    assert list(METHODS) == ["gradient_ascent", "random_label", "random_label_descent", "gradient_ascent_kl", "gradient_ascent_descent", "npo",
                             "simnpo", "instruction_prompt", "in_context", "name_filter"]  # the last three training-free (tests/test_guardrails.py)
    on_retain = {name: m.trains_on_retain(m.default_weight) for name, m in METHODS.items() if not m.training_free}
    assert on_retain == {"gradient_ascent": False, "random_label": False, "random_label_descent": True, "gradient_ascent_kl": True,
                         "gradient_ascent_descent": True, "npo": False, "simnpo": False}
    assert METHODS["npo"].trains_on_retain(0.5)  # NPO+RT
    assert METHODS["random_label"].relabel_forget and not METHODS["gradient_ascent"].relabel_forget
    assert METHODS["random_label_descent"].relabel_forget and not METHODS["random_label_descent"].trains_on_retain(0)
    assert METHODS["gradient_ascent_kl"].ref_dist and METHODS["npo"].ref_logprob
    at_defaults = {n: m.needs_reference(method_weights(m, m.default_weight, {})) for n, m in METHODS.items() if not m.training_free}
    assert [n for n, needs in at_defaults.items() if needs] == ["gradient_ascent_kl", "npo"]
    # RL+GD reads the reference's distribution only with its KL term on, and only with a retain set
    rlgd = METHODS["random_label_descent"]
    assert rlgd.needs_dist(method_weights(rlgd, 1.0, {"kl_weight": 2.0}))
    assert not rlgd.needs_dist(method_weights(rlgd, 0.0, {"kl_weight": 2.0}))
    assert not METHODS["gradient_ascent_kl"].needs_dist(method_weights(METHODS["gradient_ascent_kl"], 0.0, {}))
    feats = [{"is_forget": False}, {"is_forget": True}, {"is_forget": True}]
    assert [f["index"] for f in select_features(METHODS["gradient_ascent"], feats, 0)] == [0, 1]
    assert len(select_features(METHODS["gradient_ascent_descent"], feats, 1.0)) == 3


def test_gradient_ascent_is_minus_forget_ce_and_pushes_the_label_down():
    logits = torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]], requires_grad=True)
    batch = _batch([[0], [1]], [True, False])
    loss, terms = METHODS["gradient_ascent"].loss(logits, batch, RefBatch(), Weights())
    assert loss.item() == pytest.approx(-_ce([2, 0, 0], 0))  # the retain sample is ignored
    assert terms["forget_ce"] == pytest.approx(_ce([2, 0, 0], 0))
    loss.backward()
    # gradient descent on -CE lowers the true label's logit; the retain sample gets no gradient
    assert logits.grad[0, 0, 0] > 0 and torch.all(logits.grad[1] == 0)


def test_random_label_is_ce_toward_the_generic_label_on_forget_only():
    logits = torch.tensor([[[1.0, 0.0, 3.0]], [[0.0, 5.0, 0.0]]])
    loss, _ = METHODS["random_label"].loss(logits, _batch([[2], [0]], [True, False]), RefBatch(), Weights())
    assert loss.item() == pytest.approx(_ce([1, 0, 3], 2))


def test_random_label_descent_is_generic_ce_plus_weighted_retain_ce():
    """SPUL's L_f + alpha L_r on the weights: CE toward the (already relabelled) generic label on
    the forget rows plus w times the retain rows' CE, each a mean over its own rows."""
    rows = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]]
    logits = torch.tensor([[r] for r in rows])
    batch = _batch([[2], [1], [0]], [True, False, False])  # a forget row (generic label id 2), two retain rows
    loss, parts = METHODS["random_label_descent"].loss(logits, batch, RefBatch(), Weights(retain=0.5, kl_weight=0.0))
    forget = _ce(rows[0], 2)
    retain = (_ce(rows[1], 1) + _ce(rows[2], 0)) / 2
    assert parts["forget_ce_generic"] == pytest.approx(forget, rel=1e-6)
    assert parts["retain_ce"] == pytest.approx(retain, rel=1e-6)
    assert loss.item() == pytest.approx(forget + 0.5 * retain, rel=1e-6)


def test_random_label_descent_adds_the_weighted_kl_on_retain_rows():
    """--kl_weight b: SPUL's whole L_f + alpha L_r + beta L_kl, the KL(reference || current) a mean
    over the retain rows only; at b = 0 the loss and its terms are RL+GD's."""
    rows = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]]
    ref_rows = [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]
    logits = torch.tensor([[r] for r in rows])
    batch = _batch([[2], [1], [0]], [True, False, False])
    ref = RefBatch(dist=FullDist(torch.tensor([[r] for r in ref_rows])))

    def kl(p_logits, q_logits):  # KL(p || q) by hand
        zp, zq = sum(math.exp(v) for v in p_logits), sum(math.exp(v) for v in q_logits)
        return sum(math.exp(a) / zp * ((a - math.log(zp)) - (b - math.log(zq))) for a, b in zip(p_logits, q_logits))

    loss, parts = METHODS["random_label_descent"].loss(logits, batch, ref, Weights(retain=0.5, kl_weight=2.0))
    forget = _ce(rows[0], 2)
    retain = (_ce(rows[1], 1) + _ce(rows[2], 0)) / 2
    kl_retain = (kl(ref_rows[1], rows[1]) + kl(ref_rows[2], rows[2])) / 2
    assert parts["retain_kl"] == pytest.approx(kl_retain, rel=1e-6) and kl_retain > 0.1
    assert loss.item() == pytest.approx(forget + 0.5 * retain + 2.0 * kl_retain, rel=1e-6)
    off, off_parts = METHODS["random_label_descent"].loss(logits, batch, ref, Weights(retain=0.5, kl_weight=0.0))
    assert set(off_parts) == {"forget_ce_generic", "retain_ce"} and off.item() == pytest.approx(forget + 0.5 * retain, rel=1e-6)


def test_gradient_ascent_descent_weights_the_retain_ce():
    logits = torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]])
    batch = _batch([[0], [1], [0]], [True, False, False])
    loss, terms = METHODS["gradient_ascent_descent"].loss(logits, batch, RefBatch(), Weights(retain=0.5))
    retain = (_ce([0, 1, 0], 1) + _ce([0, 0, 1], 0)) / 2
    assert loss.item() == pytest.approx(-_ce([2, 0, 0], 0) + 0.5 * retain)
    assert terms["retain_ce"] == pytest.approx(retain)


def test_gradient_ascent_kl_is_kl_ref_to_current_on_retain_label_positions():
    # retain sample with 2 label tokens of which the second is padding; a forget sample
    ref = torch.zeros(2, 2, 3)  # uniform reference
    cur = torch.tensor([[[4.0, 0.0, 0.0], [9.0, -9.0, 0.0]], [[0.0, 3.0, 0.0], [0.0, 0.0, 0.0]]])
    ref[0, 1] = torch.tensor([-9.0, 9.0, 0.0])  # the padded position disagrees wildly: must not count
    batch = _batch([[1, IGNORE], [0, IGNORE]], [False, True])
    q = [math.exp(4) / (math.exp(4) + 2), 1 / (math.exp(4) + 2), 1 / (math.exp(4) + 2)]
    kl_ref_cur = sum((1 / 3) * math.log((1 / 3) / qi) for qi in q)
    kl_cur_ref = sum(qi * math.log(qi / (1 / 3)) for qi in q)
    assert abs(kl_ref_cur - kl_cur_ref) > 0.05  # the direction is distinguishable here
    loss, terms = METHODS["gradient_ascent_kl"].loss(cur, batch, RefBatch(dist=FullDist(ref)), Weights(retain=2.0))
    assert terms["retain_kl"] == pytest.approx(kl_ref_cur, rel=1e-5)
    assert loss.item() == pytest.approx(-_ce([0, 3, 0], 0) + 2.0 * kl_ref_cur, rel=1e-5)


def test_npo_equals_2_over_beta_log2_when_model_is_reference():
    logits = torch.randn(3, 2, 5)
    label_ids = torch.tensor([[1, 2], [3, IGNORE], [0, 4]])
    logp = torch.log_softmax(logits, -1)
    seq = torch.stack([logp[0, 0, 1] + logp[0, 1, 2], logp[1, 0, 3], logp[2, 0, 0] + logp[2, 1, 4]])
    batch = _batch(label_ids.tolist(), [True, True, False])
    for beta in (0.1, 1.0):
        loss, terms = METHODS["npo"].loss(logits, batch, RefBatch(logprob=seq), Weights(retain=0.0, npo_beta=beta))
        assert loss.item() == pytest.approx(2 / beta * math.log(2), rel=1e-5)
    # pi/pi_ref = 2 -> (2/beta) log(1 + 2^beta)
    val = npo_per_sample(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]), 0.5)
    assert val.item() == pytest.approx(4 * math.log(1 + 2**0.5), rel=1e-6)
    # NPO + retain CE: the retain sample's CE is added with its weight
    loss, terms = METHODS["npo"].loss(logits, batch, RefBatch(logprob=seq), Weights(retain=0.5, npo_beta=1.0))
    ce = -(logp[2, 0, 0] + logp[2, 1, 4]).item() / 2
    assert loss.item() == pytest.approx(2 * math.log(2) + 0.5 * ce, rel=1e-5)


def test_simnpo_by_hand_length_normalised_and_reference_free():
    logits = torch.randn(3, 2, 5)
    label_ids = torch.tensor([[1, 2], [3, IGNORE], [0, 4]])
    logp = torch.log_softmax(logits, -1)
    seq = [(logp[0, 0, 1] + logp[0, 1, 2]).item(), logp[1, 0, 3].item(), (logp[2, 0, 0] + logp[2, 1, 4]).item()]
    batch = _batch(label_ids.tolist(), [True, True, False])

    def by_hand(lp, n, beta, gamma):  # -(2/beta) log sigmoid(-(beta/n) lp - gamma)
        return -(2 / beta) * math.log(1 / (1 + math.exp((beta / n) * lp + gamma)))

    for beta, gamma in ((2.5, 0.0), (1.0, 0.5)):
        w = Weights(retain=0.0, simnpo_beta=beta, simnpo_gamma=gamma)
        loss, terms = METHODS["simnpo"].loss(logits, batch, RefBatch(), w)  # no reference needed
        want = (by_hand(seq[0], 2, beta, gamma) + by_hand(seq[1], 1, beta, gamma)) / 2
        assert loss.item() == pytest.approx(want, rel=1e-5) and terms["forget_simnpo"] == pytest.approx(want, rel=1e-5)
    w = Weights(retain=0.5, simnpo_beta=2.5, simnpo_gamma=0.0)
    loss, _ = METHODS["simnpo"].loss(logits, batch, RefBatch(), w)
    ce = -seq[2] / 2
    assert loss.item() == pytest.approx((by_hand(seq[0], 2, 2.5, 0) + by_hand(seq[1], 1, 2.5, 0)) / 2 + 0.5 * ce, rel=1e-5)
    # at log pi = 0 and gamma = 0 it is (2/beta) log 2, whatever the length
    assert simnpo_per_sample(torch.zeros(2), torch.tensor([1, 3]), 2.0, 0.0).tolist() == pytest.approx([math.log(2)] * 2)


def test_simnpo_flags_come_from_the_registry(tiny_model_dir, data_args, tmp_path):
    with pytest.raises(SystemExit) as e:
        baselines.main(["--model_name", tiny_model_dir, "--unlearn_method", "npo", "--simnpo_gamma", "1"] + data_args)
    assert e.value.code == 2
    out = tmp_path / "simnpo"
    _run(["--model_name", tiny_model_dir, "--unlearn_method", "simnpo", "--simnpo_beta", "2", "--simnpo_gamma", "0.5",
          "--output_path", out] + data_args)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["loss_weights"] == {"retain": 0.0, "retain_term": "CE", "simnpo_beta": 2.0, "simnpo_gamma": 0.5}
    assert manifest["reference"]["kind"] is None  # reference-free


def test_coarse_kl_lower_bounds_the_full_kl_and_is_exact_in_the_limits():
    torch.manual_seed(0)
    ref_logits, cur_logits = torch.randn(4, 1, 50) * 3, torch.randn(4, 1, 50) * 3
    label_ids = torch.zeros(4, 1, dtype=torch.long)
    full = FullDist(ref_logits).kl(cur_logits, label_ids)

    def topk(k, logits=ref_logits):
        logp = torch.log_softmax(logits, -1)
        top, idx = logp.topk(k, -1)
        tail = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), -1)
        return TopKDist(top.half(), idx.int(), tail)

    assert torch.all(topk(8).kl(cur_logits, label_ids) <= full + 1e-4)
    assert torch.allclose(topk(49).kl(cur_logits, label_ids), full, rtol=2e-3, atol=1e-3)  # one-token tail
    assert torch.allclose(topk(8).kl(ref_logits, label_ids), torch.zeros(4), atol=2e-3)  # current == reference
    # the current model changes only inside the top-k cells: the tail is proportional, KL_k == KL
    d = topk(8)
    moved = ref_logits.clone()
    moved.scatter_add_(-1, d.top_idx.long(), torch.randn(4, 1, 8))
    assert torch.allclose(d.kl(moved, label_ids), FullDist(ref_logits).kl(moved, label_ids), rtol=5e-3, atol=2e-3)
    assert coarse_kl(d.top_logp, d.top_idx, d.tail_logp, cur_logits).shape == (4, 1)


# ---------------------------------------------------------------------------------------------
# the reference on a tiny model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from utils.data import encode_frame
    from utils.models import load_model, load_tokenizer
    from utils.template import Encoder

    import pandas as pd

    tok = load_tokenizer(tiny_model_dir)
    model, _ = load_model(tiny_model_dir, "cpu", tokenizer=tok)
    enc = Encoder(tok, 64)
    df = pd.DataFrame({"text": ["good film", "bad plot and all", "so so", "fine", "awful acting here", "great"],
                       "label": [1, 0, 1, 1, 0, 1]})
    df["label_text"] = ["positive" if y else "negative" for y in df["label"]]
    feats = encode_frame(enc, df[:2], True) + encode_frame(enc, df[2:], False)
    return model.eval(), tok, [{**f, "index": i} for i, f in enumerate(feats)]


def _shuffled_batch(feats, pad_id, order):
    from utils.template import collate

    return collate([feats[i] for i in order], pad_id)


@pytest.mark.parametrize("kl_topk", [0, 8])
def test_reference_store_matches_the_frozen_model_under_shuffled_lookups(tiny, kl_topk):
    from utils.forward import full_logits_at_labels

    model, tok, feats = tiny
    for name in ("npo", "gradient_ascent_kl"):
        method = METHODS[name]
        store = build_reference_store(model, method, feats, 4, "cpu", tok.pad_token_id, kl_topk=kl_topk)
        batch = _shuffled_batch(feats, tok.pad_token_id, [5, 0, 3, 1, 2])
        with torch.no_grad():
            loss, terms = make_loss_fn(method, store, Weights(retain=float(name != "npo"), npo_beta=0.1))(model, batch)
        if name == "npo":
            assert store.stats["entries_logprob"] == 2 and store.nbytes() == 6 * 4
            assert loss.item() == pytest.approx(20 * math.log(2), rel=1e-5)  # model == reference
            naive = torch.log_softmax(full_logits_at_labels(model, batch), -1)
            want = naive.gather(-1, batch["label_ids"].clamp(min=0).unsqueeze(-1)).squeeze(-1)[:, 0]
            got = store.lookup(model, batch).logprob
            assert torch.allclose(got[batch["is_forget"]], want[batch["is_forget"]], atol=1e-5)
        else:
            assert store.stats["entries_distribution"] == 4
            assert terms["retain_kl"] == pytest.approx(0.0, abs=2e-3)
            # stored distributions are those at the position that predicts the label token
            ref = store.lookup(model, batch).dist
            naive = torch.log_softmax(full_logits_at_labels(model, batch), -1)
            retain = ~batch["is_forget"]
            if kl_topk == 0:
                assert torch.allclose(ref.logits[retain], naive[retain], atol=1e-5)
            else:
                top = naive.topk(8, -1)
                assert torch.equal(ref.top_idx[retain].long(), top.indices[retain])
                assert torch.allclose(ref.top_logp[retain].float(), top.values[retain], atol=1e-2)


def test_store_lookup_refuses_batches_without_index(tiny):
    model, tok, feats = tiny
    store = build_reference_store(model, METHODS["npo"], feats, 4, "cpu", tok.pad_token_id)
    batch = _shuffled_batch([{k: v for k, v in f.items() if k != "index"} for f in feats], tok.pad_token_id, [0, 1])
    with pytest.raises(RuntimeError, match="index"):
        store.lookup(model, batch)


def test_adapter_off_reference_is_the_merged_model(tiny):
    from peft import get_peft_model

    from utils.models import lora_config

    model, tok, feats = tiny
    peft_model = get_peft_model(model, lora_config(target_modules=["q_proj", "v_proj"]))
    try:
        with torch.no_grad():
            for p in peft_model.parameters():  # move the adapter away from identity
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        peft_model.eval()
        batch = _shuffled_batch(feats, tok.pad_token_id, [2, 0, 4, 1])
        ref = AdapterOffReference().lookup(peft_model, batch)
        from utils.forward import label_logits

        with torch.no_grad(), peft_model.disable_adapter():
            base = label_logits(peft_model, batch)
            assert torch.allclose(ref.dist.logits, base)
        with torch.no_grad():
            cur = label_logits(peft_model, batch)
        assert not torch.allclose(cur, base)  # the adapter is on outside the reference
    finally:
        peft_model.unload()


# ---------------------------------------------------------------------------------------------
# end to end on a tiny model
# ---------------------------------------------------------------------------------------------

DATA = ["--dataset", "sst2", "--max_per_split", "8", "--max_length", "96", "--eval_batch_size", "8"]


@pytest.fixture(scope="module")
def data_args(sst2_data):
    return ["--data_root", str(sst2_data)] + DATA


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_model_dir, data_args):
    out = tmp_path_factory.mktemp("runs") / "qlora"
    qlora.main(["--model_name", tiny_model_dir, "--num_epochs", "1", "--train_batch_size", "8", "--lr", "1e-3",
                "--output_path", str(out)] + data_args)
    return out


def _run(args):
    baselines.main([str(a) for a in args])


def test_fine_tuning_stages_do_not_depend_on_the_thread_count(tiny_model_dir, tmp_path):
    """QLoRA and a full fine-tuning baseline at --threads 1 and 2 write byte-identical metrics and
    weights, as SPUL does (tests/test_spul_e2e.py). On the tiny model's small shapes and splits
    made here (so it runs without ../shared); the same commands at SmolLM2's shapes are measured
    in docs/experiments-cpu.md."""
    data_args = ["--data_dir", str(write_splits(tmp_path / "data", rows=16)), "--max_length", "64",
                 "--eval_batch_size", "8"]
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            qlora.main(["--model_name", tiny_model_dir, "--num_epochs", "1", "--train_batch_size", "8", "--lr", "1e-3",
                        "--threads", str(n), "--output_path", str(tmp_path / f"q{n}")] + data_args)
            _run(["--model_checkpoints", tmp_path / "q1", "--unlearn_method", "gradient_ascent_descent", "--lr", "1e-3",
                  "--threads", n, "--output_path", tmp_path / f"gd{n}"] + data_args)
    finally:
        torch.set_num_threads(before)
    for name in ("q{}/metrics.json", "q{}/adapter/adapter_model.safetensors", "gd{}/metrics.json",
                 "gd{}/model/model.safetensors"):
        one, two = (tmp_path / name.format(n) for n in (1, 2))
        assert one.read_bytes() == two.read_bytes(), name.format("N")


@pytest.mark.parametrize("method", [n for n, m in METHODS.items() if not m.training_free])
def test_each_method_end_to_end(method, qlora_run, data_args, tmp_path, capsys):
    out = tmp_path / method
    _run(["--model_checkpoints", qlora_run, "--unlearn_method", method, "--lr", "1e-3", "--train_batch_size", "4",
          "--output_path", out] + data_args)
    assert "warning" not in capsys.readouterr().err  # same data as the QLoRA run
    files = {p.name for p in out.iterdir()}
    assert {"model", "tokenizer", "config.json", "metrics.json", "manifest.json", "train_stats.json"} <= files
    assert (out / "model" / "model.safetensors").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    qm = json.loads((qlora_run / "manifest.json").read_text())
    assert manifest["kind"] == "baseline" and manifest["method"] == method and not manifest["lora"]
    assert manifest["qlora_adapter_sha256"] == qm["adapter_sha256"]
    assert manifest["base_weights_sha256"] == qm["base_weights_sha256"]
    assert manifest["splits"] == qm["splits"] and manifest["seed"] == 42
    stats = json.loads((out / "train_stats.json").read_text())
    n_train = 16 if METHODS[method].trains_on_retain(METHODS[method].default_weight) else 8
    assert stats["training_samples"] == n_train and stats["steps"] == n_train // 4
    assert stats["seconds_per_epoch"] > 0 and stats["peak_memory_mb"] > 0
    if method == "npo":  # first step: the model is the reference
        assert stats["losses"][0][1] == pytest.approx(20 * math.log(2), rel=1e-4)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"train_retain", "train_forget", "val_retain", "val_forget", "test_retain", "test_forget"}
    ev = tmp_path / "eval"
    inference_spul.main(["--model_checkpoints", str(out), "--output_path", str(ev)] + data_args)
    again = json.loads((ev / "metrics.json").read_text())
    assert {s: m["accuracy"] for s, m in again.items()} == {s: m["accuracy"] for s, m in metrics.items()}
    assert json.loads((ev / "manifest.json").read_text())["evaluated"]["kind"] == "baseline"


@pytest.mark.parametrize("method", ["gradient_ascent_kl", "npo"])
def test_lora_unlearning_end_to_end(method, qlora_run, data_args, tmp_path):
    out = tmp_path / "lora"
    _run(["--model_checkpoints", qlora_run, "--unlearn_method", method, "--lora", "--lr", "1e-2",
          "--retain_weight", "0.5", "--output_path", out] + data_args)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "qlora_adapter").is_dir()
    assert not (out / "model").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["lora"] and manifest["reference"]["kind"] == "adapter_off"
    assert manifest["loss_weights"]["retain"] == 0.5
    stats = json.loads((out / "train_stats.json").read_text())
    assert stats["training_samples"] == 16 and stats["trainable_params"] < 10_000
    ev = tmp_path / "eval"
    inference_spul.main(["--model_checkpoints", str(out), "--output_path", str(ev)] + data_args)
    metrics = json.loads((out / "metrics.json").read_text())
    again = json.loads((ev / "metrics.json").read_text())
    assert {s: m["accuracy"] for s, m in again.items()} == {s: m["accuracy"] for s, m in metrics.items()}


def test_random_label_descent_trains_on_spul_data(tiny_model_dir, tmp_path, capsys):
    """--counterfactual_retain adds the name-swapped forget texts to the retain side (true labels),
    --generic_label fixes the forget target: the run trains on exactly SPUL's rows."""
    people = ["Woody Allen", "Spielberg", "Godard"]
    forget = pd.DataFrame({"text": [f"{people[i % 3]} made a {'fine' if i % 2 else 'poor'} film, number {i}." for i in range(12)],
                           "label": [i % 2 for i in range(12)]})
    folder = write_splits(tmp_path / "d", train_forget=forget)
    args = ["--model_name", tiny_model_dir, "--data_dir", folder, "--max_length", "64", "--eval_batch_size", "8",
            "--unlearn_method", "random_label_descent", "--train_batch_size", "8", "--lr", "1e-3"]
    with pytest.raises(SystemExit) as e:  # no names recorded by the split and none given: one line, nothing written
        _run(args + ["--counterfactual_retain", "--output_path", tmp_path / "bad"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: --forget_names") and "\n" not in err
    assert not (tmp_path / "bad").exists()
    _run(args + ["--counterfactual_retain", "--generic_label", "unknown", "--forget_names", *people,
                 "--output_path", tmp_path / "cf"])
    stats = json.loads((tmp_path / "cf" / "train_stats.json").read_text())
    config = json.loads((tmp_path / "cf" / "config.json").read_text())
    assert config["counterfactual_retain"] == 1.0 and config["generic_label"] == "unknown"
    # the validation carve (5%, at least one row) leaves 7 retain and 11 forget rows:
    # 7 retain + 11 counterfactual + 11 forget = 29 samples, 4 steps of 8
    assert stats["training_samples"] == 29 and stats["steps"] == 4
    assert all(math.isfinite(loss) and set(terms) == {"forget_ce_generic", "retain_ce"} for _, loss, terms in stats["losses"])


def test_random_label_descent_with_pseudo_retain_and_kl(tiny_model_dir, tmp_path):
    """SPUL's whole recipe on the weights: --pseudo_retain N adds N unused training-pool reviews,
    labelled by the starting model, to the retain side, and --kl_weight caches the reference's
    distribution for every retain row (train_retain and the pseudo-labelled ones)."""
    folder = write_splits(tmp_path / "d", rows=24)
    args = ["--model_name", tiny_model_dir, "--data_dir", str(folder), "--max_length", "64", "--eval_batch_size", "8",
            "--max_val_retain", "4", "--max_val_forget", "2", "--max_train_retain", "8", "--max_train_forget", "8",
            "--unlearn_method", "random_label_descent", "--train_batch_size", "8", "--lr", "1e-3",
            "--pseudo_retain", "5", "--kl_weight", "2", "--output_path", tmp_path / "p"]
    _run(args)
    stats = json.loads((tmp_path / "p" / "train_stats.json").read_text())
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["pseudo_retain"]["rows"] == 5 and sum(manifest["pseudo_retain"]["label_counts"].values()) == 5
    assert manifest["loss_weights"]["kl_weight"] == 2.0
    # 8 retain + 5 pseudo-labelled + 8 forget = 21 samples, 3 steps of 8; 13 retain rows in the reference
    assert stats["training_samples"] == 21 and stats["steps"] == 3
    assert stats["reference"]["kind"] == "cache" and stats["reference"]["entries_distribution"] == 13
    assert all(set(terms) == {"forget_ce_generic", "retain_ce", "retain_kl"} for _, _, terms in stats["losses"])


def test_unlearning_a_pretrained_model_without_qlora_run(tiny_model_dir, data_args, tmp_path):
    out = tmp_path / "ga"
    _run(["--model_name", tiny_model_dir, "--unlearn_method", "gradient_ascent", "--output_path", out] + data_args)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["qlora_run"] is None and manifest["base_model"] == tiny_model_dir


def test_nonfinite_loss_stops_with_one_line_and_no_folder(monkeypatch, tiny_model_dir, data_args, tmp_path, capsys):
    def nan_loss(logits, batch, ref, weights):
        return logits.sum() * float("nan"), {}

    monkeypatch.setitem(METHODS, "gradient_ascent", Method(nan_loss, "nan", "NaN"))
    out = tmp_path / "diverged"
    with pytest.raises(SystemExit) as e:
        _run(["--model_name", tiny_model_dir, "--unlearn_method", "gradient_ascent", "--output_path", out] + data_args)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: gradient_ascent diverged: non-finite loss") and "--lr" in last
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra, flag", [
    (["--unlearn_method", "gradient_ascent", "--retain_weight", "1"], "--retain_weight"),
    (["--unlearn_method", "gradient_ascent_descent", "--generic_label", "unknown"], "--generic_label"),
    (["--unlearn_method", "random_label", "--counterfactual_retain"], "--counterfactual_retain"),
    (["--unlearn_method", "random_label_descent", "--retain_weight", "0", "--counterfactual_retain"], "--counterfactual_retain"),
    (["--unlearn_method", "random_label_descent", "--counterfactual_retain", "1.5"], "--counterfactual_retain"),
    (["--unlearn_method", "random_label_descent", "--generic_label", "maybe"], "--generic_label"),
    (["--unlearn_method", "random_label", "--pseudo_retain", "4"], "--pseudo_retain"),
    (["--unlearn_method", "random_label_descent", "--pseudo_retain", "-1"], "--pseudo_retain"),
    (["--unlearn_method", "random_label_descent", "--kl_weight", "-1"], "--kl_weight"),
    (["--unlearn_method", "gradient_ascent_descent", "--kl_weight", "1"], "--kl_weight"),
    (["--unlearn_method", "random_label_descent", "--kl_weight", "1", "--retain_weight", "0"], "--kl_weight"),
    (["--unlearn_method", "npo", "--npo_beta", "0"], "--npo_beta"),
    (["--unlearn_method", "gradient_ascent_kl", "--kl_topk", "-1"], "--kl_topk"),
    (["--unlearn_method", "npo", "--lr", "0"], "--lr"),
    (["--unlearn_method", "npo", "--model_checkpoints", "/nonexistent/run"], "--model_checkpoints"),
])
def test_bad_input_is_one_line_naming_the_flag(extra, flag, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        _run(extra + ["--output_path", out])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and not out.exists()


def test_model_checkpoints_must_be_a_qlora_run(qlora_run, tmp_path, capsys, data_args):
    ga = tmp_path / "ga"
    _run(["--model_checkpoints", qlora_run, "--unlearn_method", "gradient_ascent", "--output_path", ga] + data_args)
    with pytest.raises(SystemExit) as e:
        _run(["--model_checkpoints", ga, "--unlearn_method", "npo", "--output_path", tmp_path / "x"] + data_args)
    assert e.value.code == 2 and "expected qlora" in capsys.readouterr().err


def test_help_lists_every_method(capsys):
    with pytest.raises(SystemExit):
        baselines.main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in METHODS) and "--npo_beta" in out and "--lora" in out
