"""Loss helpers on label-position logits (B, K, V) and label ids (B, K) with -100 padding.

Every helper returns one value per sample, averaged over that sample's label tokens;
``masked_mean`` then averages a term over the samples it applies to (0 when there are none).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
    kl = (ref_logp.exp() * (ref_logp - cur_logp)).sum(-1)
    return _per_sample(kl, label_ids)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the samples where ``mask`` is true; 0 (with grad) if none."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)
