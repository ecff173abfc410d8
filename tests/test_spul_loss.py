"""The SPUL loss L = L_f + alpha * L_r + beta * L_kl on hand-built logits, against values
computed by hand; the on-the-fly reference of SpulObjective; seeded generic labels."""
import math

import pandas as pd
import pytest
import torch

from utils.data import training_set
from utils.forward import gather_label_logits, label_logits
from tests.tiny import tiny_llama
from utils.spul_loss import SpulObjective, spul_loss
from utils.template import IGNORE, collate
from utils.task import SENTIMENT

GENERIC_LABELS = SENTIMENT.generic_labels

LN2, LN3 = math.log(2), math.log(3)


def probs_to_logits(*rows):
    """(B, K, V) logits whose softmax is the given probability rows (one list per sample,
    each a list of K distributions)."""
    return torch.log(torch.tensor(rows, dtype=torch.float))


def make_batch(label_ids, is_forget):
    label_ids = torch.tensor(label_ids)
    return {"label_ids": label_ids, "is_forget": torch.tensor(is_forget), "label_pos": torch.zeros_like(label_ids)}


# distributions over a vocabulary of 4
P_HALF = [0.5, 0.25, 0.125, 0.125]  # CE of token 0: ln 2; of token 1: ln 4; of token 2: ln 8
UNIFORM = [0.25, 0.25, 0.25, 0.25]  # CE of any token: ln 4


def test_forget_only_batch():
    logits = probs_to_logits([P_HALF], [UNIFORM])
    batch = make_batch([[0], [3]], [True, True])
    loss, terms = spul_loss(logits, logits.clone(), batch, alpha=1.0, beta=1.0)
    want_f = (LN2 + 2 * LN2) / 2  # mean of ln 2 and ln 4
    assert terms["L_f"] == pytest.approx(want_f)
    assert terms["L_r"] == 0.0 and terms["L_kl"] == 0.0
    assert loss.item() == pytest.approx(want_f)


def test_retain_only_batch():
    logits = probs_to_logits([P_HALF], [UNIFORM])
    ref = probs_to_logits([UNIFORM], [UNIFORM])
    batch = make_batch([[1], [2]], [False, False])
    loss, terms = spul_loss(logits, ref, batch, alpha=0.5, beta=2.0)
    want_r = (2 * LN2 + 2 * LN2) / 2  # token 1 under P_HALF: ln 4; token 2 under UNIFORM: ln 4
    # KL(uniform || P_HALF) = sum 1/4 * ln((1/4) / q) = 1/4 (ln 1/2 + 0 + ln 2 + ln 2) = ln2 / 4; second sample 0
    want_kl = (LN2 / 4 + 0.0) / 2
    assert terms["L_f"] == 0.0
    assert terms["L_r"] == pytest.approx(want_r)
    assert terms["L_kl"] == pytest.approx(want_kl)
    assert loss.item() == pytest.approx(0.5 * want_r + 2.0 * want_kl)


def test_mixed_batch_averages_each_term_over_its_own_samples():
    # sample 0 forget (generic label token 3), samples 1, 2 retain
    logits = probs_to_logits([UNIFORM], [P_HALF], [P_HALF])
    ref = probs_to_logits([P_HALF], [UNIFORM], [P_HALF])  # the forget row of ref must be ignored
    batch = make_batch([[3], [0], [2]], [True, False, False])
    loss, terms = spul_loss(logits, ref, batch, alpha=1.0, beta=1.0)
    want_f = 2 * LN2  # one forget sample: divided by 1, not by B = 3
    want_r = (LN2 + 3 * LN2) / 2  # divided by the 2 retain samples
    want_kl = (LN2 / 4 + 0.0) / 2
    assert terms["L_f"] == pytest.approx(want_f)
    assert terms["L_r"] == pytest.approx(want_r)
    assert terms["L_kl"] == pytest.approx(want_kl)
    assert loss.item() == pytest.approx(want_f + want_r + want_kl)


def test_beta_zero_and_alpha_zero():
    logits = probs_to_logits([UNIFORM], [P_HALF])
    ref = probs_to_logits([UNIFORM], [UNIFORM])
    batch = make_batch([[3], [0]], [True, False])
    want_f, want_r, want_kl = 2 * LN2, LN2, LN2 / 4
    loss, terms = spul_loss(logits, ref, batch, alpha=0.7, beta=0.0)
    assert loss.item() == pytest.approx(want_f + 0.7 * want_r)
    assert terms["L_kl"] == pytest.approx(want_kl)  # still logged
    loss, _ = spul_loss(logits, None, batch, alpha=0.7, beta=0.0)  # no reference needed
    assert loss.item() == pytest.approx(want_f + 0.7 * want_r)
    loss, terms = spul_loss(logits, ref, batch, alpha=0.0, beta=0.3)
    assert loss.item() == pytest.approx(want_f + 0.3 * want_kl)


def test_kl_direction_is_reference_to_prompted():
    p, q = [0.75, 0.25], [0.5, 0.5]  # reference p (no prompt), current q (with prompt)
    logits, ref = probs_to_logits([q]), probs_to_logits([p])
    batch = make_batch([[0]], [False])
    _, terms = spul_loss(logits, ref, batch, alpha=0.0, beta=1.0)
    kl_pq = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.1308
    kl_qp = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # 0.1438
    assert terms["L_kl"] == pytest.approx(kl_pq)
    assert abs(terms["L_kl"] - kl_qp) > 1e-3


def test_multi_token_labels_are_averaged_per_sample_first():
    # retain sample 0 has 2 label tokens, sample 1 has 1 (padded with -100)
    logits = probs_to_logits([P_HALF, UNIFORM], [UNIFORM, P_HALF])
    ref = probs_to_logits([UNIFORM, UNIFORM], [UNIFORM, UNIFORM])
    batch = make_batch([[1, 0], [0, IGNORE]], [False, False])
    _, terms = spul_loss(logits, ref, batch, alpha=1.0, beta=1.0)
    per_sample = [(2 * LN2 + 2 * LN2) / 2, 2 * LN2]  # [ln4 (P_HALF, tok 1), ln4 (UNIFORM)], [ln4]
    assert terms["L_r"] == pytest.approx(sum(per_sample) / 2)
    # KL(uniform || P_HALF) = ln2/4 on sample 0's first token only; the padded position is not counted
    assert terms["L_kl"] == pytest.approx(((LN2 / 4 + 0.0) / 2 + 0.0) / 2)
    # token-level averaging would give a different number
    logits2 = probs_to_logits([P_HALF, P_HALF], [UNIFORM, UNIFORM])
    batch2 = make_batch([[2, 2], [0, IGNORE]], [False, False])
    _, t2 = spul_loss(logits2, None, batch2, alpha=1.0, beta=0.0)
    assert t2["L_r"] == pytest.approx((3 * LN2 + 2 * LN2) / 2)  # per sample: ln8, ln4
    assert abs(t2["L_r"] - (3 * LN2 + 3 * LN2 + 2 * LN2) / 3) > 1e-3


def test_virtual_token_offset_and_label_predicting_position():
    """Full logits have p + L positions; the label token at text index j is predicted by text
    index j - 1, i.e. logits row p + j - 1."""
    p, L, V = 3, 5, 4
    feats = [{"input_ids": [0, 1, 2, 3, 2], "label_ids": [2], "label": 0, "is_forget": False}]
    batch = collate(feats, pad_id=0)
    assert batch["label_pos"].tolist() == [[3]]  # label at index 4, predicted by index 3
    full = torch.log(torch.full((1, p + L, V), 0.25))  # uniform everywhere ...
    full[0, p + 3] = torch.log(torch.tensor(P_HALF))  # ... except at the predicting position
    full[0, p + 4] = torch.log(torch.tensor([0.7, 0.1, 0.1, 0.1]))  # the label token's own row
    ref = torch.log(torch.full((1, 1, V), 0.25))
    logits = gather_label_logits(full, batch["label_pos"], num_virtual=p)
    _, terms = spul_loss(logits, ref, batch, alpha=1.0, beta=1.0)
    assert terms["L_r"] == pytest.approx(3 * LN2)  # token 2 under P_HALF: ln 8
    assert terms["L_kl"] == pytest.approx(LN2 / 4)
    # the public release's mistakes give other numbers: no offset, or one position too late
    _, no_offset = spul_loss(gather_label_logits(full, batch["label_pos"], 0), ref, batch, 1.0, 1.0)
    _, too_late = spul_loss(gather_label_logits(full, batch["label_pos"] + 1, p), ref, batch, 1.0, 1.0)
    assert no_offset["L_r"] == pytest.approx(2 * LN2) and no_offset["L_kl"] == pytest.approx(0.0, abs=1e-6)
    assert too_late["L_r"] == pytest.approx(-math.log(0.1))


def test_loss_is_differentiable_without_forget_or_retain_samples():
    logits = probs_to_logits([P_HALF], [UNIFORM]).requires_grad_(True)
    for flags in ([False, False], [True, True]):
        loss, _ = spul_loss(logits, logits.detach(), make_batch([[0], [1]], flags), 1.0, 1.0)
        loss.backward()
        assert torch.isfinite(logits.grad).all()
        logits.grad = None


def tiny_batch(is_forget):
    feats = [
        {"input_ids": [1, 5, 6, 7, 8], "label_ids": [8], "label": 1, "is_forget": is_forget[0]},
        {"input_ids": [1, 5, 9, 10, 11, 12, 13], "label_ids": [12, 13], "label": 0, "is_forget": is_forget[1]},
        {"input_ids": [1, 5, 14, 15], "label_ids": [15], "label": 1, "is_forget": is_forget[2]},
    ]
    return collate(feats, pad_id=0)


def test_objective_reference_is_the_same_model_without_prompt():
    model = tiny_llama(32, seed=0).eval().requires_grad_(False)  # frozen, as in spul.py
    prompt = torch.randn(3, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)  # not the global RNG: no test-order dependence
    batch = tiny_batch([True, False, False])
    objective = SpulObjective(lambda m: prompt, alpha=1.0, beta=1.0)
    loss, terms = objective(model, batch)
    with torch.no_grad():
        ref = label_logits(model, batch)
        cur = label_logits(model, batch, prompt)
    _, want = spul_loss(cur, ref, batch, 1.0, 1.0)
    # the objective runs the prompt through its key/value cache: equal logits up to float
    # rounding, which a KL this small (~6e-4) sees at the 1e-5 relative level
    assert terms["L_kl"] == pytest.approx(want["L_kl"], rel=1e-4)
    assert terms["L_r"] == pytest.approx(want["L_r"], rel=1e-5)
    assert terms["L_kl"] > 0  # the prompt changes the distribution
    loss.backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    cost = objective.cost()
    assert cost["steps_with_reference"] == 1 and cost["bytes_kept_between_steps"] == 0
    assert cost["reference_peak_bytes_per_step"] == 3 * 2 * 32 * 4  # (B, K, V) fp32


def test_objective_skips_reference_when_beta_is_zero_or_no_retain():
    model = tiny_llama(32, seed=0).eval()
    prompt = torch.randn(2, 32)
    objective = SpulObjective(lambda m: prompt, alpha=1.0, beta=0.0)
    objective(model, tiny_batch([False, False, True]))
    objective = SpulObjective(lambda m: prompt, alpha=1.0, beta=1.0)
    _, terms = objective(model, tiny_batch([True, True, True]))
    assert objective.cost()["steps_with_reference"] == 0 and terms["L_kl"] == 0.0


def _splits(n_forget):
    df = pd.DataFrame({"text": [f"review {i}" for i in range(n_forget)], "label": [i % 2 for i in range(n_forget)]})
    df["label_text"] = ["negative", "positive"] * (n_forget // 2)
    return {"train_retain": df.iloc[:4], "train_forget": df}


def test_generic_labels_are_seeded(tiny_model_dir):
    from utils.models import load_tokenizer
    from utils.template import Encoder

    encoder = Encoder(load_tokenizer(tiny_model_dir), 64)
    generic_ids = {tuple(encoder.label_ids(w)) for w in GENERIC_LABELS}

    def forget_targets(seed):
        feats = training_set(encoder, _splits(40), seed, relabel_forget=True)
        return [tuple(f["label_ids"]) for f in feats if f["is_forget"]]

    a, b, c = forget_targets(1), forget_targets(1), forget_targets(2)
    assert a == b
    assert a != c
    assert set(a) <= generic_ids and len(set(a)) == 2  # both generic labels drawn, never a task label
    retain = [f for f in training_set(encoder, _splits(40), 1, relabel_forget=True) if not f["is_forget"]]
    assert [f["label_ids"] for f in retain] == [encoder.label_ids(w) for w in _splits(40)["train_retain"]["label_text"]]


@pytest.mark.parametrize("cache", [False, True])
def test_objective_runs_its_no_grad_forwards_on_one_thread(cache):
    """The KL reference and the fixed prefix's cache run on one CPU thread (utils.invariant: the
    first reference forward of a run gave memory-state dependent bits at 2 threads), and the
    prompted forward with grad on all of them; the thread count is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = tiny_llama(32, seed=0).eval().requires_grad_(False)
        seen = []
        model.model.layers[0].register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), torch.get_num_threads())))
        prompt = torch.randn(3, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        prefix = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
        objective = SpulObjective(lambda m: prompt, alpha=1.0, beta=1.0, reference_cache=cache, fixed_prefix=prefix)
        objective(model, tiny_batch([True, False, False]))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    no_grad = [n for grad, n in seen if not grad]
    with_grad = [n for grad, n in seen if grad]
    assert len(no_grad) == 2 and set(no_grad) == {1}  # the prefix cache, then the reference
    assert with_grad and set(with_grad) == {2}  # the prompt's cache and the batch


def test_forget_fit_note_above_ln_2k_only():
    from utils.spul_loss import forget_fit_note

    assert forget_fit_note([]) is None
    assert forget_fit_note([{"loss": 9.0}]) is None  # no forget term recorded
    assert forget_fit_note([{"L_f": 5.0}, {"L_f": 0.693}]) is None  # the last epoch counts; 0.693 < ln 2
    note = forget_fit_note([{"L_f": 0.1}, {"L_f": 0.694}])
    assert note.startswith("note: the forget loss L_f averaged 0.694 over the last epoch, above ln 2 = 0.693")
    assert forget_fit_note([{"L_f": 1.38}], generic_labels=2) is None  # two drawn labels: ln 4 = 1.386
    assert "above ln 4 = 1.386" in forget_fit_note([{"L_f": 1.39}], generic_labels=2)
