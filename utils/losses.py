"""Loss helpers on label-position logits (B, K, V) and label ids (B, K) with -100 padding.

Every helper returns one value per sample, averaged over that sample's label tokens;
``masked_mean`` then averages a term over the samples it applies to (0 when there are none).

Global normalisation (several processes, gradient accumulation): a loss term is a mean over
the samples of one *optimiser step* (all micro-batches of all processes), not over the share
one forward sees. ``utils.training.train`` puts the step's sample counts in
``batch["global_counts"]`` (``{"forget": n_f, "retain": n_r, "all": n}``); ``masked_mean`` and
``batch_mean`` given such a count return the local *sum* divided by it, so that the terms of all
forwards of a step add up to the step's mean. Without one they are today's per-batch means.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.invariant import one_thread
from utils.template import IGNORE


def _valid(label_ids: torch.Tensor) -> torch.Tensor:
    return (label_ids != IGNORE).float()


def _per_sample(token_values: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
    valid = _valid(label_ids)
    return (token_values * valid).sum(1) / valid.sum(1).clamp(min=1)


def token_logprobs(logits: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
    """log p(label token) at each label position, (B, K); 0 at padding."""
    logp = F.log_softmax(logits.float(), dim=-1)
    safe = label_ids.clamp(min=0).unsqueeze(-1)
    return logp.gather(-1, safe).squeeze(-1) * _valid(label_ids)


def ce_per_sample(logits: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample, averaged over its label tokens, (B,)."""
    return _per_sample(-token_logprobs(logits, label_ids), label_ids)


def sequence_logprob(logits: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
    """log p(label sequence) per sample: the sum over its label tokens, (B,)."""
    return token_logprobs(logits, label_ids).sum(1)


def kl_per_sample(ref_logits: torch.Tensor, logits: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
    """KL(reference || current) over the full vocabulary at each label position, averaged
    over the sample's label tokens, (B,). ``ref_logits`` carries no gradient."""
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    cur_logp = F.log_softmax(logits.float(), dim=-1)
    terms = ref_logp.exp() * (ref_logp - cur_logp)  # element-wise: the same bits at any thread count
    with one_thread(terms.device):  # one row's sum over the vocabulary is split between threads otherwise
        kl = terms.sum(-1)
    return _per_sample(kl, label_ids)


GLOBAL_COUNTS = "global_counts"  # the batch key of the step's sample counts (utils.training)


def global_count(batch: dict, which: str) -> int | None:
    """The number of ``which`` ("forget", "retain", "all") samples in the whole optimiser step
    the batch belongs to, or None when the batch carries no counts (plain per-batch means)."""
    counts = batch.get(GLOBAL_COUNTS)
    return None if counts is None else int(counts[which])


def masked_mean(values: torch.Tensor, mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over the samples where ``mask`` is true; 0 (with grad) if none.
    With ``count`` (the number of such samples in the whole step, see ``global_count``): the sum
    over this batch's masked samples divided by ``count`` (this batch's share of the step mean)."""
    mask = mask.to(values.dtype)
    total = (values * mask).sum()
    if count is None:
        return total / mask.sum().clamp(min=1)
    return total / values.new_tensor(float(max(count, 1)))


def batch_mean(values: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """``values.mean()``; with ``count`` (the step's number of samples) the sum divided by it."""
    if count is None:
        return values.mean()
    return values.sum() / values.new_tensor(float(max(count, 1)))
