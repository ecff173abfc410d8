"""Evaluation on the four splits: one teacher-forced forward per example, the argmax over the
whole vocabulary at the position that predicts the first label token (paper §5).

The same forward also yields, per example, the log-probabilities (whole-vocabulary softmax) of
the task labels' first tokens: the per-example records that the forgetting audit
(``utils.mia``: membership-inference AUC, privleak, forget quality) is computed from, with no
second pass.

An input filter (a training-free run's ``Loaded.input_filter``: ``hits(texts)`` -> bool per
text, ``label`` a generic label) answers the texts it catches itself: they never reach the
model, their prediction is the filter label's first token, their restricted prediction is -1
(no task label: wrong) and every task label gets the log-probability ``FILTERED_LOGPROB`` (no
mass), so their membership scores are one constant."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from utils import distributed
from utils.data import EVAL_SPLITS, encode_frame
from utils.forward import PromptCache, label_logits, to_device
from utils.metrics import classification_metrics, map_predictions
from utils.mia import mia_metrics
from utils.template import check_labels, collate


def label_token_ids(encoder, words) -> list[int]:
    """First in-context token of each word; they must differ (``utils.template.check_labels``),
    or argmax predictions are ambiguous."""
    check_labels(encoder, words)
    return [encoder.label_ids(w)[0] for w in words]


def length_batches(features: list[dict], batch_size: int) -> list[list[int]]:
    """Indices grouped by length (longest first) so that padding stays small."""
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class Predictions:
    """Per example: the argmax vocabulary id, the argmax over the task labels only, and the
    log-probabilities (whole-vocabulary softmax) of the task labels' first tokens."""

    ids: np.ndarray
    restricted: np.ndarray
    label_logprobs: np.ndarray  # (n, number of task labels), float64


@torch.inference_mode()
def predict(model, features, batch_size, device, pad_id, prompt=None, task_ids=None, desc="eval") -> Predictions:
    """Per example: see ``Predictions``. A prompt's key/value cache is computed once here and
    reused by every batch (``PromptCache``).

    Under several processes the length-sorted batches are dealt out round-robin (each example
    runs in the same batch as in one process) and the predictions are gathered by example
    index, each exactly once, so every rank returns the single-process result."""
    cache = PromptCache.build(model, prompt) if prompt is not None else None
    pred = np.zeros(len(features), dtype=np.int64)
    restricted = np.zeros(len(features), dtype=np.int64)
    logprobs = np.zeros((len(features), len(task_ids)), dtype=np.float64)
    mine = distributed.shard(length_batches(features, batch_size))  # all batches in one process
    for idx in tqdm(mine, desc=desc, unit="batch", leave=False, disable=not distributed.is_main()):
        batch = to_device(collate([features[i] for i in idx], pad_id), device)
        logits = label_logits(model, batch, prompt_cache=cache)[:, 0]  # first label token
        pred[idx] = logits.argmax(-1).cpu().numpy()
        restricted[idx] = logits[:, task_ids].argmax(-1).cpu().numpy()
        logprobs[idx] = torch.log_softmax(logits, -1)[:, task_ids].double().cpu().numpy()
    if distributed.world_size() > 1:
        done = [i for idx in mine for i in idx]
        parts = distributed.gather_objects((done, list(zip(pred[done].tolist(), restricted[done].tolist(), logprobs[done].tolist()))))
        merged = distributed.merge_by_index(parts, len(features))
        pred = np.array([m[0] for m in merged], dtype=np.int64)
        restricted = np.array([m[1] for m in merged], dtype=np.int64)
        logprobs = np.array([m[2] for m in merged], dtype=np.float64).reshape(len(features), len(task_ids))
    return Predictions(pred, restricted, logprobs)


FILTERED_LOGPROB = float(np.log(np.finfo(np.float64).tiny))  # a task label's log-prob on a filtered row


def with_filtered(kept: Predictions, hit: np.ndarray, answer_id: int) -> Predictions:
    """The predictions for all rows: ``kept`` (the model's, on the rows where ``hit`` is False,
    in order) and the filter's answer on the others."""
    hit = np.asarray(hit, dtype=bool)
    n, k = len(hit), kept.label_logprobs.shape[1]
    ids = np.full(n, answer_id, dtype=np.int64)
    restricted = np.full(n, -1, dtype=np.int64)
    logprobs = np.full((n, k), FILTERED_LOGPROB, dtype=np.float64)
    ids[~hit], restricted[~hit], logprobs[~hit] = kept.ids, kept.restricted, kept.label_logprobs
    return Predictions(ids, restricted, logprobs)


def filter_hits(input_filter, df) -> np.ndarray:
    """(n,) bool: the rows of ``df`` an input filter catches (none without a filter)."""
    return input_filter.hits(df["text"]) if input_filter is not None else np.zeros(len(df), dtype=bool)


@dataclass
class Evaluation:
    """What one evaluation pass gives: metrics per split, one record per example, and the
    membership-inference AUCs per side (``utils.mia.mia_metrics``; a side is there when both its
    member and non-member splits were evaluated)."""

    metrics: dict
    records: list[dict] = field(default_factory=list)
    mia: dict = field(default_factory=dict)


def example_records(split: str, df, preds: Predictions) -> list[dict]:
    """One JSON-able record per example: enough to recompute every metric and audit figure."""
    return [{"split": split, "row": i, "label": int(y), "pred_id": int(p), "label_logprobs": [float(v) for v in lp]}
            for i, (y, p, lp) in enumerate(zip(df["label"], preds.ids, preds.label_logprobs))]


def evaluate(model, encoder, splits, batch_size, device, prompt=None, split_names=None, input_filter=None) -> Evaluation:
    """Metrics and per-example records for each split (see utils.metrics, utils.mia) with the
    model in eval mode; by default every split ``splits`` holds (the four paper splits and the
    validation splits). ``input_filter``: see the module docstring."""
    split_names = [s for s in (split_names or EVAL_SPLITS) if s in splits]
    was_training = model.training
    model.eval()
    task = encoder.task
    task_ids = label_token_ids(encoder, task.label_words)
    generic_ids = label_token_ids(encoder, task.generic_labels)
    pad_id = encoder.tokenizer.pad_token_id
    results, records, scores = {}, [], {}
    for name in split_names:
        df = splits[name]
        feats = encode_frame(encoder, df, is_forget=name.endswith("forget"))
        hit = filter_hits(input_filter, df)
        preds = predict(model, [f for f, h in zip(feats, hit) if not h], batch_size, device, pad_id, prompt, task_ids, desc=name)
        if hit.any():
            preds = with_filtered(preds, hit, label_token_ids(encoder, [input_filter.label])[0])
        results[name] = classification_metrics(
            df["label"].to_numpy(), map_predictions(preds.ids, task_ids), preds.ids, generic_ids, preds.restricted,
            task.label_words)
        records += example_records(name, df, preds)
        scores[name] = {"logprobs": preds.label_logprobs, "labels": df["label"].to_numpy()}
    model.train(was_training)
    return Evaluation(results, records, mia_metrics(scores))


def evaluate_splits(model, encoder, splits, batch_size, device, prompt=None, split_names=None, input_filter=None) -> dict:
    """``evaluate(...).metrics``: metrics per split, without the records."""
    return evaluate(model, encoder, splits, batch_size, device, prompt, split_names, input_filter).metrics


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table: one row per model, ACC / F1 for each split any row has."""
    names = [s for s in EVAL_SPLITS if any(s in res for res in rows.values())]
    head = "| model | " + " | ".join(s.replace("_", " ") for s in names) + " |"
    lines = [head, "|---" * (len(names) + 1) + "|"]
    for name, res in rows.items():
        cells = [f"{res[s]['accuracy']:.2f} / {res[s]['f1']:.2f}" if s in res else "-" for s in names]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
