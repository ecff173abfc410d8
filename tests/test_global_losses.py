"""Loss terms normalised by the counts of the whole step batch (``batch["global_counts"]``):
on hand-built logits, a batch split over two "ranks" (or two accumulation micro-batches) gives,
summed, exactly the one-process terms and gradients, for SPUL and every baseline; without the
counts every term stays the per-batch mean."""
import math

import pytest
import torch

from utils.baselines import METHODS, FullDist, RefBatch, Weights
from utils.losses import GLOBAL_COUNTS, batch_mean, global_count, masked_mean
from utils.spul_loss import spul_loss
from utils.training import micro_batches, step_counts

LN2 = math.log(2)


def probs_to_logits(*rows):
    return torch.log(torch.tensor(rows, dtype=torch.float))


def make_batch(label_ids, is_forget, counts=None):
    label_ids = torch.tensor(label_ids)
    batch = {"label_ids": label_ids, "is_forget": torch.tensor(is_forget), "label_pos": torch.zeros_like(label_ids)}
    if counts is not None:
        batch[GLOBAL_COUNTS] = counts
    return batch


def rows(batch, idx):
    """The sub-batch of rows ``idx`` (what one rank gets), keeping the global counts."""
    return {k: (v[idx] if torch.is_tensor(v) else v) for k, v in batch.items()}


def counts_of(is_forget):
    f = sum(is_forget)
    return {"all": len(is_forget), "forget": f, "retain": len(is_forget) - f}


def test_masked_mean_with_a_global_count_by_hand():
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.tensor([True, False, True, False])
    assert masked_mean(v, mask).item() == 2.0  # (1 + 3) / 2
    assert masked_mean(v, mask, count=5).item() == pytest.approx(4 / 5)  # (1 + 3) / 5
    assert masked_mean(v, torch.zeros(4, dtype=torch.bool), count=0).item() == 0.0  # no sample anywhere: 0
    assert masked_mean(v, torch.zeros(4, dtype=torch.bool), count=3).item() == 0.0  # none here: contributes 0
    assert batch_mean(v).item() == 2.5 and batch_mean(v, count=8).item() == pytest.approx(10 / 8)
    assert global_count({}, "forget") is None and global_count({GLOBAL_COUNTS: {"forget": 3}}, "forget") == 3


def test_forget_term_of_F_R_R_R_split_over_two_ranks_is_the_one_process_term():
    # [F, R, R, R]: the forget sample's CE is ln 2 * 4 (token 3 of P has p = 1/16); one process: L_f = 4 ln 2
    P = [0.75, 0.125, 0.0625, 0.0625]
    logits = probs_to_logits([P], [P], [P], [P])
    forget = [True, False, False, False]
    whole = make_batch([[3], [0], [1], [2]], forget)
    _, one = spul_loss(logits, None, whole, alpha=1.0, beta=0.0)
    assert one["L_f"] == pytest.approx(4 * LN2, rel=1e-6)
    # two ranks [F, R] and [R, R] with per-rank means: rank 0 has L_f = 4 ln 2, rank 1 has 0; averaged: 2 ln 2 (the old bug)
    r0, r1 = [0, 1], [2, 3]
    local = [spul_loss(logits[r], None, rows(whole, r), 1.0, 0.0)[1]["L_f"] for r in (r0, r1)]
    assert sum(local) / 2 == pytest.approx(2 * LN2, rel=1e-6)
    # with the global counts each rank's share adds up to the one-process term
    glob = make_batch([[3], [0], [1], [2]], forget, counts_of(forget))
    shares = [spul_loss(logits[r], None, rows(glob, r), 1.0, 0.0)[1] for r in (r0, r1)]
    assert shares[0]["L_f"] + shares[1]["L_f"] == pytest.approx(one["L_f"], rel=1e-6)
    for k in ("L_r", "loss"):
        assert shares[0][k] + shares[1][k] == pytest.approx(one[k], rel=1e-6)


SPLITS = [([0, 1], [2, 3, 4, 5]), ([0, 2, 4], [1, 3, 5]), ([0, 1, 2], [3, 4, 5]), ([5], [0, 1, 2, 3, 4])]


def _random_case(seed=0, B=6, K=2, V=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, V, generator=g)
    ref = torch.randn(B, K, V, generator=g)
    labels = torch.randint(0, V, (B, K), generator=g)
    labels[1, 1] = labels[4, 1] = -100  # ragged labels
    forget = [True, True, False, False, False, False]  # both forget samples first: [F,F | R,R,R,R] puts them on one rank
    return logits, ref, labels.tolist(), forget


def _check_split(fn, logits, whole, glob, split):
    """``fn(logits, batch) -> (loss, terms)``: the summed shares of the parts of ``split`` of
    ``glob`` (the batch with global counts; values and gradients with respect to the logits)
    against ``whole`` (the same batch without counts) in one piece. Returns the terms."""
    x = logits.clone().requires_grad_(True)
    loss, terms = fn(x, whole)
    loss.backward()
    y = logits.clone().requires_grad_(True)
    total, sums = 0.0, {}
    for part in split:
        part_loss, part_terms = fn(y[part], rows(glob, part))
        part_loss.backward()
        total += part_loss.item()
        for k, v in part_terms.items():
            sums[k] = sums.get(k, 0.0) + v
    assert sums.keys() == terms.keys() and all(sums[k] == pytest.approx(terms[k], abs=1e-6) for k in terms), (sums, terms)
    assert total == pytest.approx(loss.item(), abs=1e-6)
    assert torch.allclose(y.grad, x.grad, atol=1e-7, rtol=0)
    return terms


def _batches(labels, forget):
    """The whole batch without and with global counts; ``_rows`` (the sample ids) rides along so
    that a part can pick its reference rows."""
    extra = {"_rows": torch.arange(len(forget))}
    return {**make_batch(labels, forget), **extra}, {**make_batch(labels, forget, counts_of(forget)), **extra}


@pytest.mark.parametrize("split", SPLITS)
def test_spul_terms_with_global_counts_add_up_to_one_process(split):
    logits, ref, labels, forget = _random_case()

    def fn(x, batch):
        return spul_loss(x, ref[batch["_rows"]], batch, alpha=0.7, beta=0.5)

    terms = _check_split(fn, logits, *_batches(labels, forget), split)
    assert terms["L_f"] > 0 and terms["L_r"] > 0 and terms["L_kl"] > 0  # every term is exercised


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("method", ["gradient_ascent", "random_label", "random_label_descent", "gradient_ascent_kl",
                                    "gradient_ascent_descent", "npo"])
def test_baseline_terms_with_global_counts_add_up_to_one_process(method, split):
    logits, ref, labels, forget = _random_case(seed=1)
    ref_logp = torch.randn(6, generator=torch.Generator().manual_seed(3)) - 5
    weights = Weights(retain=0.6, npo_beta=0.3, kl_weight=0.8)  # RL+GD with its KL term on
    m = METHODS[method]

    def fn(x, batch):
        sel = batch["_rows"]
        return m.loss(x, batch, RefBatch(logprob=ref_logp[sel], dist=FullDist(ref[sel])), weights)

    terms = _check_split(fn, logits, *_batches(labels, forget), split)
    assert all(v != 0 for v in terms.values())  # every term is exercised


def test_step_counts_and_micro_batches():
    feats = [{"is_forget": i < 3} for i in range(10)]
    assert step_counts(feats, [0, 5, 1, 6, 7]) == {"all": 5, "forget": 2, "retain": 3}
    assert micro_batches([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert micro_batches([1, 2, 3], 2, pad_to=3) == [[1, 2], [3], []]
