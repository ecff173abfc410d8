"""Forgetting audit from per-example label-position scores: membership inference (MIA) AUC,
privleak against a retrain oracle, and forget quality (two-sample Kolmogorov-Smirnov).

Every score comes from the evaluation forward itself: for each example the log-probabilities
(softmax over the whole vocabulary) of the task labels' first tokens at the label-predicting
position, ``logprobs[i, c]``. From them, with ``y`` the true class:

- LOSS score: ``-NLL = logprobs[i, y]`` (members of the training set tend to have lower loss);
- stable logit score (Carlini et al. 2022): ``log p(y) - log sum_{c != y} p(c)`` over the task
  labels;
- true-label probability ``p(y) = exp(logprobs[i, y])`` (the forget-quality distribution).

AUC is the ROC AUC of telling members (``train_*``) from non-members (``test_*``) by the score,
higher score = member. 0.5: indistinguishable. Far above 0.5: the training examples are still
recognisable. Far *below* 0.5 is leakage too: the set now stands out by scoring *lower* than
unseen data (an over-forgotten forget set), which an attacker reads just as well.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score

SCORES = ("loss", "logit")
SIDES = {"forget": ("train_forget", "test_forget"), "retain": ("train_retain", "test_retain")}


def true_logprob(logprobs, labels) -> np.ndarray:
    """log p(y) of each example's true class: the negative of the LOSS."""
    logprobs = np.asarray(logprobs, dtype=np.float64)
    return logprobs[np.arange(len(logprobs)), np.asarray(labels, dtype=int)]


def logit_score(logprobs, labels) -> np.ndarray:
    """``log p(y) - log sum_{c != y} p(c)`` over the task labels, computed stably."""
    logprobs = np.asarray(logprobs, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    rows = np.arange(len(logprobs))
    others = logprobs.copy()
    others[rows, labels] = -np.inf
    top = others.max(axis=1, keepdims=True)
    rest = top[:, 0] + np.log(np.exp(others - top).sum(axis=1))
    return logprobs[rows, labels] - rest


def membership_scores(logprobs, labels, score: str) -> np.ndarray:
    if score == "loss":
        return true_logprob(logprobs, labels)
    if score == "logit":
        return logit_score(logprobs, labels)
    raise ValueError(f"unknown MIA score {score!r} (choose from {', '.join(SCORES)})")


def auc(member_scores, nonmember_scores) -> float:
    """ROC AUC of members against non-members, higher score = member."""
    m, n = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    if len(m) == 0 or len(n) == 0:
        raise ValueError("auc: needs at least one member and one non-member")
    y = np.r_[np.ones(len(m)), np.zeros(len(n))]
    return float(roc_auc_score(y, np.r_[m, n]))


def privleak(run_auc: float, oracle_auc: float) -> float:
    """``(AUC - AUC_oracle) / AUC_oracle`` in %: 0 is the oracle's privacy; either sign is leakage."""
    return 100.0 * (run_auc - oracle_auc) / oracle_auc


def forget_quality(run_p_true, oracle_p_true) -> float:
    """p-value of the two-sample KS test between the run's and the oracle's true-label
    probabilities on train_forget: high means indistinguishable from the oracle."""
    return float(ks_2samp(np.asarray(run_p_true, float), np.asarray(oracle_p_true, float)).pvalue)


def mia_metrics(per_split: dict[str, dict]) -> dict:
    """AUC per side and score from ``{split: {"logprobs": (n, C), "labels": (n,)}}``; a side
    whose member or non-member split is missing is left out."""
    out = {}
    for side, (members, nonmembers) in SIDES.items():
        if members not in per_split or nonmembers not in per_split:
            continue
        out[side] = {
            f"{score}_auc": auc(membership_scores(per_split[members]["logprobs"], per_split[members]["labels"], score),
                                membership_scores(per_split[nonmembers]["logprobs"], per_split[nonmembers]["labels"], score))
            for score in SCORES
        }
    return out
