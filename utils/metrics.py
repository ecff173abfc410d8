"""Classification metrics from label-position predictions (scikit-learn, no hub scripts).

A prediction is a vocabulary id (the argmax over the whole vocabulary at the position that
predicts the first label token). It maps to a class index when it is the first token of a
task label word; anything else (a generic label, any other token) counts as wrong, as in the
paper (§5 of the notes).
"""
from __future__ import annotations

import numpy as np
from scipy.stats import t as student_t
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from utils.task import OTHER  # class index for "not a task label"


def map_predictions(pred_ids, label_token_ids: list[int]) -> np.ndarray:
    """Vocabulary ids -> class index (position in ``label_token_ids``) or OTHER."""
    lookup = {tok: i for i, tok in enumerate(label_token_ids)}
    return np.array([lookup.get(int(t), OTHER) for t in pred_ids], dtype=int)


def classification_metrics(
    y_true, y_pred, pred_ids=None, generic_token_ids=(), restricted_pred=None, label_names=("negative", "positive")
) -> dict:
    # label_names: the task's label words (utils.task.Task.label_words); the default is the
    # sentiment task's, for direct calls on hand-made predictions
    """Accuracy, weighted precision/recall/F1 (%) with OTHER as its own wrong class, plus
    accuracy restricted to the task labels (``restricted_pred``: argmax over the task labels
    only) and the distribution of predictions."""
    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    n = len(y_true)
    labels = list(range(len(label_names)))  # weights come from the true classes only
    kw = dict(labels=labels, average="weighted", zero_division=0)
    out = {
        "n": n,
        "accuracy": 100 * accuracy_score(y_true, y_pred),
        "f1": 100 * f1_score(y_true, y_pred, **kw),
        "precision": 100 * precision_score(y_true, y_pred, **kw),
        "recall": 100 * recall_score(y_true, y_pred, **kw),
    }
    if restricted_pred is not None:
        out["accuracy_restricted"] = 100 * accuracy_score(y_true, np.asarray(restricted_pred))
    dist = {name: int((y_pred == i).sum()) for i, name in enumerate(label_names)}
    generic = np.isin(np.asarray(pred_ids), list(generic_token_ids)) if pred_ids is not None else np.zeros(n, bool)
    dist["generic"] = int(generic.sum())
    dist["other"] = int(((y_pred == OTHER) & ~generic).sum())
    out["predictions"] = dist
    return out


def seed_spread(correct) -> dict:
    """How one split's accuracy spreads over seeds, read from its per-review outcomes.

    ``correct``: (seeds, reviews) array of 0/1, one row per seed, the same reviews in the same
    order. Returns, in %: ``accuracies`` (per seed), ``std`` (their population std, as the
    tables print it), ``review_std`` and ``same_share``.

    ``review_std`` is the spread the seeds would show if every review were its own coin, flipped
    independently on each seed with the rate it has over these seeds (p_i): sqrt(sum p_i (1 - p_i))
    / n. Under that model it is what the population variance over S seeds comes to on average
    (both carry the same (S - 1) / S factor), so ``std`` well above it means whole seeds differ
    (one seed keeps many reviews, another few), and ``std`` near it means the spread is
    review-by-review chance, which no single fix of a seed removes. ``same_share``: the reviews
    with the same outcome on every seed."""
    c = np.asarray(correct, dtype=float)
    if c.ndim != 2 or c.shape[0] < 2 or c.shape[1] == 0:
        raise ValueError(f"need (seeds >= 2, reviews >= 1) outcomes, got shape {c.shape}")
    acc = 100 * c.mean(axis=1)
    p = c.mean(axis=0)
    return {
        "accuracies": [float(a) for a in acc],
        "std": float(acc.std()),
        "review_std": float(100 * np.sqrt((p * (1 - p)).sum()) / c.shape[1]),
        "same_share": float(100 * ((p == 0) | (p == 1)).mean()),
    }


def paired_difference(a, b, level: float = 0.95) -> dict:
    """How much ``a`` differs from ``b`` when both were measured on the same seeds: the
    per-seed differences a_i - b_i, their mean, their sample std (n - 1) and the two-sided
    Student-t interval at ``level`` for the mean difference (n - 1 degrees of freedom).

    Pairing removes what both share on a seed (here: the fine-tuned model a method starts
    from), so the interval is narrower than one built from the two rows' own stds. It covers
    the variation over training seeds on the fixed evaluation reviews, not the sampling of
    other reviews."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"need two equal-length series of two seeds or more, got {a.shape} and {b.shape}")
    d = a - b
    n = len(d)
    mean, std = float(d.mean()), float(d.std(ddof=1))
    half = float(student_t.ppf((1 + level) / 2, n - 1)) * std / np.sqrt(n)
    return {"n": n, "differences": [float(x) for x in d], "mean": mean, "std": std,
            "low": float(mean - half), "high": float(mean + half)}
