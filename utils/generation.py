"""The generation protocol of the paper's Vanilla rows (its release's ``inference_vanilla.py``):
greedy decoding of a few new tokens after ``... ### Sentiment:`` and string matching of the
label words, anything else a third class counted wrong.

Every other row of the paper (and ``utils.evaluation``) is scored by the argmax protocol: one
teacher-forced forward, argmax over the vocabulary at the position that predicts the first
label token. The first greedy token here is that same argmax; the protocols differ in what
counts as an answer (the first label word anywhere in the generated text, against the first
token only).

Decoding runs on the model's own backbone and LM head with the key/value cache. Batches are
right padded: each row's first new token is read at its own last position, and every new token
is appended as one more column at position ``p + length + t``, so pad columns sit in the middle
of the cache, masked, and a padded row computes what it computes alone. An optional soft
prompt comes from ``utils.forward.PromptCache`` (built once), its p positions in front.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from utils import distributed
from utils.data import EVAL_SPLITS, encode_frame
from utils.evaluation import filter_hits, label_token_ids, length_batches
from utils.forward import PromptCache, backbone, head_logits, unwrap
from utils.metrics import OTHER, classification_metrics

MAX_NEW_TOKENS = 5  # the release's inference_vanilla.py
NUM_EXAMPLES = 5  # decoded generations kept per split in metrics.json


# ---------------------------------------------------------------------------------------------
# Greedy decoding
# ---------------------------------------------------------------------------------------------


def prompt_features(encoder, df, is_forget: bool = False) -> list[dict]:
    """The encoded examples without their label: ``input_ids`` end with ``### Sentiment:``.
    Encoded as the argmax protocol encodes them (the true label word decides how far the text
    is truncated), so both protocols see the same tokens."""
    feats = encode_frame(encoder, df, is_forget)
    return [{**f, "input_ids": f["input_ids"][: -len(f["label_ids"])]} for f in feats]


def right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, lengths) for rows of token ids, right padded with ``pad_id``."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    mask = (torch.arange(ids.size(1)) < lengths[:, None]).long()
    return ids.to(device), mask.to(device), lengths.to(device)


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids: the tokenizer's and the model's generation config's (an int or a list)."""
    ids = {tokenizer.eos_token_id}
    config = getattr(unwrap(model), "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return sorted(i for i in ids if i is not None)


def _forward(model, ids, mask, positions, cache):
    """Backbone over ``ids`` at ``positions`` after what ``cache`` holds (``mask`` covers
    both); returns the last hidden states and the grown cache."""
    embeds = unwrap(model).get_input_embeddings()(ids)
    out = backbone(model)(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                          past_key_values=cache, use_cache=True)
    return out.last_hidden_state, out.past_key_values


def _until_stop(tokens: list[int], stop_ids) -> list[int]:
    """The tokens before the first stop token."""
    for k, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:k]
    return tokens


@torch.inference_mode()
def greedy_decode(model, rows, pad_id, device, max_new_tokens=MAX_NEW_TOKENS, prompt_cache: PromptCache | None = None,
                  stop_ids=()) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy decoding of ``max_new_tokens`` tokens after each row of ``rows`` (token id lists,
    any lengths), in one batch. Returns the new tokens of each row, cut before its first stop
    token, and the fp32 logits (B, V) that chose the first new token. Decoding ends early once
    every row has produced a stop token; what comes after one is never returned."""
    ids, mask, lengths = right_pad(rows, pad_id, device)
    B, L = ids.shape
    p = prompt_cache.length if prompt_cache is not None else 0
    cache = prompt_cache.for_batch(B) if prompt_cache is not None else None
    mask = torch.cat([mask.new_ones(B, p), mask], dim=1)
    positions = torch.arange(p, p + L, device=ids.device).unsqueeze(0).expand(B, -1)
    hidden, cache = _forward(model, ids, mask, positions, cache)
    logits = head_logits(model, hidden[torch.arange(B, device=ids.device), lengths - 1])
    first_logits = logits
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=ids.device)
    new, done = [], torch.zeros(B, dtype=torch.bool, device=ids.device)
    for t in range(max_new_tokens):
        token = logits.argmax(-1)
        new.append(token)
        done |= torch.isin(token, stop)
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        hidden, cache = _forward(model, token[:, None], mask, (p + lengths + t)[:, None], cache)
        logits = head_logits(model, hidden[:, -1])
    tokens = torch.stack(new, dim=1).tolist()
    return [_until_stop(row, set(stop_ids)) for row in tokens], first_logits


# ---------------------------------------------------------------------------------------------
# One split, several splits
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate(model, tokenizer, features, batch_size, device, prompt=None, max_new_tokens=MAX_NEW_TOKENS,
             task_ids=None, desc="generate") -> tuple[list[str], np.ndarray | None]:
    """Decoded generations of every example (in order) and, with ``task_ids``, the argmax over
    those ids at the first generated position. A prompt's cache is built once for all batches.

    Under several processes the length-sorted batches are dealt out round-robin and gathered by
    example index, as ``utils.evaluation.predict`` does, so every rank returns the
    single-process result."""
    cache = PromptCache.build(model, prompt) if prompt is not None else None
    stop_ids = stop_token_ids(model, tokenizer)
    texts, restricted = [""] * len(features), [-1] * len(features)
    mine = distributed.shard(length_batches(features, batch_size))
    for idx in tqdm(mine, desc=desc, unit="batch", leave=False, disable=not distributed.is_main()):
        rows = [features[i]["input_ids"] for i in idx]
        new, first = greedy_decode(model, rows, tokenizer.pad_token_id, device, max_new_tokens, cache, stop_ids)
        for k, i in enumerate(idx):
            texts[i] = tokenizer.decode(new[k], skip_special_tokens=True)
        if task_ids is not None:
            for k, r in zip(idx, first[:, task_ids].argmax(-1).tolist()):
                restricted[k] = r
    if distributed.world_size() > 1:
        done = [i for idx in mine for i in idx]
        parts = distributed.gather_objects((done, [(texts[i], restricted[i]) for i in done]))
        merged = distributed.merge_by_index(parts, len(features))
        texts, restricted = [m[0] for m in merged], [m[1] for m in merged]
    return texts, (np.array(restricted, dtype=np.int64) if task_ids is not None else None)


def generate_predictions(model, encoder, df, batch_size, device, prompt=None, max_new_tokens=MAX_NEW_TOKENS):
    """(decoded generations, class predictions: index into the task's label words or OTHER)
    for ``df``."""
    texts, _ = generate(model, encoder.tokenizer, prompt_features(encoder, df), batch_size, device, prompt, max_new_tokens)
    return texts, np.array([encoder.task.parse(t) for t in texts], dtype=int)


def generation_metrics(task, y_true, texts: list[str], restricted) -> dict:
    """``classification_metrics`` of generations. Its ``pred_ids``/``generic_token_ids`` are
    answer indices here (``Task.answer_index``), so ``predictions["generic"]`` counts generations
    with a generic label and no task label. ``accuracy_restricted`` is the argmax over the
    labels' first tokens at the first generated position (the argmax protocol's)."""
    k = len(task.label_words)
    answers = np.array([task.answer_index(t) for t in texts], dtype=int)
    pred = np.where((answers >= 0) & (answers < k), answers, OTHER)
    generic = range(k, k + len(task.generic_labels))
    out = classification_metrics(y_true, pred, answers, generic, restricted, task.label_words)
    out["examples"] = texts[:NUM_EXAMPLES]
    return out


def evaluate_generation(model, encoder, splits, batch_size, device, prompt=None, split_names=None,
                        max_new_tokens=MAX_NEW_TOKENS, input_filter=None) -> dict:
    """Metrics for each split under the generation protocol, in the format of
    ``utils.evaluation.evaluate_splits`` (plus ``examples``: the first decoded generations). The
    texts an ``input_filter`` catches are not generated: the answer is the filter's label."""
    split_names = [s for s in (split_names or EVAL_SPLITS) if s in splits]
    was_training = model.training
    model.eval()
    task_ids = label_token_ids(encoder, encoder.task.label_words)
    results = {}
    for name in split_names:
        df = splits[name]
        feats = prompt_features(encoder, df, is_forget=name.endswith("forget"))
        hit = filter_hits(input_filter, df)
        kept, kept_restricted = generate(model, encoder.tokenizer, [f for f, h in zip(feats, hit) if not h], batch_size,
                                         device, prompt, max_new_tokens, task_ids, desc=name)
        texts = [" " + input_filter.label if h else "" for h in hit]  # the filter's answer
        for i, text in zip(np.flatnonzero(~hit), kept):
            texts[i] = text
        restricted = np.full(len(df), -1, dtype=np.int64)
        restricted[~hit] = kept_restricted
        results[name] = generation_metrics(encoder.task, df["label"].to_numpy(), texts, restricted)
    model.train(was_training)
    return results
