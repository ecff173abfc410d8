"""Evaluation on the four splits: one teacher-forced forward per example, the argmax over the
whole vocabulary at the position that predicts the first label token (paper §5)."""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from utils import distributed
from utils.data import EVAL_SPLITS, encode_frame
from utils.forward import PromptCache, label_logits, to_device
from utils.metrics import classification_metrics, map_predictions
from utils.template import GENERIC_LABELS, LABEL_WORDS, collate


def label_token_ids(encoder, words) -> list[int]:
    """First token of each word; they must differ, or argmax predictions are ambiguous."""
    firsts = [encoder.label_ids(w)[0] for w in words]
    if len(set(firsts)) != len(firsts):
        raise ValueError(f"the labels {list(words)} share a first token under this tokenizer")
    return firsts


def length_batches(features: list[dict], batch_size: int) -> list[list[int]]:
    """Indices grouped by length (longest first) so that padding stays small."""
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def predict(model, features, batch_size, device, pad_id, prompt=None, task_ids=None, desc="eval"):
    """Per example: argmax vocabulary id and argmax over the task labels only. A prompt's
    key/value cache is computed once here and reused by every batch (``PromptCache``).

    Under several processes the length-sorted batches are dealt out round-robin (each example
    runs in the same batch as in one process) and the predictions are gathered by example
    index, each exactly once, so every rank returns the single-process result."""
    cache = PromptCache.build(model, prompt) if prompt is not None else None
    pred = np.zeros(len(features), dtype=np.int64)
    restricted = np.zeros(len(features), dtype=np.int64)
    mine = distributed.shard(length_batches(features, batch_size))  # all batches in one process
    for idx in tqdm(mine, desc=desc, unit="batch", leave=False, disable=not distributed.is_main()):
        batch = to_device(collate([features[i] for i in idx], pad_id), device)
        logits = label_logits(model, batch, prompt_cache=cache)[:, 0]  # first label token
        pred[idx] = logits.argmax(-1).cpu().numpy()
        restricted[idx] = logits[:, task_ids].argmax(-1).cpu().numpy()
    if distributed.world_size() > 1:
        done = [i for idx in mine for i in idx]
        parts = distributed.gather_objects((done, list(zip(pred[done].tolist(), restricted[done].tolist()))))
        merged = distributed.merge_by_index(parts, len(features))
        pred = np.array([m[0] for m in merged], dtype=np.int64)
        restricted = np.array([m[1] for m in merged], dtype=np.int64)
    return pred, restricted


def evaluate_splits(model, encoder, splits, batch_size, device, prompt=None, split_names=None) -> dict:
    """Metrics for each split (see utils.metrics) with the model in eval mode; by default every
    split ``splits`` holds (the four paper splits and the validation splits)."""
    split_names = [s for s in (split_names or EVAL_SPLITS) if s in splits]
    was_training = model.training
    model.eval()
    task_ids = label_token_ids(encoder, LABEL_WORDS)
    generic_ids = label_token_ids(encoder, GENERIC_LABELS)
    pad_id = encoder.tokenizer.pad_token_id
    results = {}
    for name in split_names:
        df = splits[name]
        feats = encode_frame(encoder, df, is_forget=name.endswith("forget"))
        pred_ids, restricted = predict(model, feats, batch_size, device, pad_id, prompt, task_ids, desc=name)
        results[name] = classification_metrics(
            df["label"].to_numpy(), map_predictions(pred_ids, task_ids), pred_ids, generic_ids, restricted
        )
    model.train(was_training)
    return results


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table: one row per model, ACC / F1 for each split any row has."""
    names = [s for s in EVAL_SPLITS if any(s in res for res in rows.values())]
    head = "| model | " + " | ".join(s.replace("_", " ") for s in names) + " |"
    lines = [head, "|---" * (len(names) + 1) + "|"]
    for name, res in rows.items():
        cells = [f"{res[s]['accuracy']:.2f} / {res[s]['f1']:.2f}" if s in res else "-" for s in names]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
