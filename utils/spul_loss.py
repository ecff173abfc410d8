"""The SPUL objective  L = L_f + alpha * L_r + beta * L_kl  (paper §1), on label-position logits.

- ``L_f``: cross-entropy toward the generic label, on forget samples, with the prompt;
- ``L_r``: cross-entropy toward the true label, on retain samples, with the prompt;
- ``L_kl``: KL(reference || with prompt) over the full vocabulary, on retain samples, where the
  reference is the same frozen model without the prompt.

Every term is taken at the positions that *predict* the label tokens (``batch["label_pos"]``),
averaged over each sample's label tokens, then over the samples it applies to in the batch, and
is 0 when the batch has none. With ``batch["global_counts"]`` (several processes, gradient
accumulation: ``utils.losses.global_count``) a term is this batch's sum over its samples divided
by their number in the whole optimiser step, so the terms of all forwards add up to the paper's
means over the global batch. ``spul_loss`` is a pure function of tensors; ``SpulObjective`` is
the training step that produces them (the reference on the fly, under ``torch.no_grad``, with the
prompt bypassed: no second model copy, nothing cached between steps) and times the reference.
"""
from __future__ import annotations

import math
import time

import torch

from utils import distributed
from utils.forward import PromptCache, cache_compatible, head_logits, label_hidden, label_logits, unwrap
from utils.invariant import one_thread
from utils.losses import ce_per_sample, global_count, kl_per_sample, masked_mean
from utils.prompt import join_prefix
from utils.template import IGNORE


def spul_loss(logits: torch.Tensor, ref_logits: torch.Tensor | None, batch: dict, alpha: float, beta: float):
    """``logits``: (B, K, V) with the prompt; ``ref_logits``: (B, K, V) without it (only the
    retain rows are read; None gives L_kl = 0). Labels in ``batch["label_ids"]`` are already the
    generic labels for forget samples. Returns (loss, {"L_f", "L_r", "L_kl", "loss"} floats).
    With ``batch["global_counts"]`` each term is normalised by the step's count of its samples
    (forget for L_f, retain for L_r and L_kl) instead of the batch's."""
    label_ids = batch["label_ids"]
    forget = batch["is_forget"].bool()
    retain = ~forget
    n_forget, n_retain = global_count(batch, "forget"), global_count(batch, "retain")
    ce = ce_per_sample(logits, label_ids)
    l_f = masked_mean(ce, forget, n_forget)
    l_r = masked_mean(ce, retain, n_retain)
    if ref_logits is not None:  # also logged when beta is 0
        l_kl = masked_mean(kl_per_sample(ref_logits, logits, label_ids), retain, n_retain)
    else:
        l_kl = logits.new_zeros(())
    loss = l_f + alpha * l_r + beta * l_kl
    terms = {"L_f": l_f.item(), "L_r": l_r.item(), "L_kl": l_kl.item(), "loss": loss.item()}
    return loss, terms


def forget_fit_note(epoch_means: list[dict], generic_labels: int = 1) -> str | None:
    """A one-line note when the prompt has not fit the forget set by the end of training: the
    last epoch's mean forget loss (``TrainStats.epoch_means``) above ln(2k), with k the number
    of generic labels the forget samples are drawn from (1 with ``--generic_label``). Above it,
    even a prompt that splits its generic answers evenly as the draw does gives the generic
    labels together a geometric-mean probability below 1/2. None otherwise."""
    bound = math.log(2 * generic_labels)
    last = epoch_means[-1] if epoch_means else {}
    if last.get("L_f", 0.0) <= bound:
        return None
    return (f"note: the forget loss L_f averaged {last['L_f']:.3f} over the last epoch, above ln {2 * generic_labels} = {bound:.3f}: "
            f"the prompt may not have fit the forget set (check train_forget ACC)")


def select_rows(batch: dict, rows: torch.Tensor) -> dict:
    """The sub-batch of the samples where ``rows`` is true (per-sample tensors only)."""
    B = batch["input_ids"].size(0)
    return {k: v[rows] if torch.is_tensor(v) and v.dim() > 0 and v.size(0) == B else v for k, v in batch.items()}


def _sharded() -> bool:
    """True under FSDP (``accelerate launch`` with an FSDP config), where the prompt's KV cache
    is not used: the prompt is prepended instead (same loss and gradient)."""
    return distributed.sharded()


def has_dropout(model) -> bool:
    """True when the frozen model drops activations in training mode (a dropout module or an
    attention dropout above 0): its no-prompt reference is then not a fixed function of the
    input, and ``ReferenceHiddenCache`` would freeze one draw of it."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    return (any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in base.modules())
            or float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0)


class ReferenceHiddenCache:
    """The default store for the KL reference: the frozen model's no-prompt final hidden states at
    the label-predicting positions of each retain input seen so far (keyed by its token ids).
    The model never changes during SPUL, so from the second epoch on a sample's reference
    logits are the LM head applied to its stored states: the on-the-fly values up to float
    rounding, for d numbers per label position (d/V of a full-vocabulary cache) instead of a
    forward pass of the whole model."""

    def __init__(self):
        self.entries: dict[tuple, torch.Tensor] = {}
        self.nbytes = 0
        self.hits = self.misses = 0

    def hidden(self, model, batch) -> torch.Tensor:
        """(B, K, d) no-prompt hidden states at the label-predicting positions of ``batch``."""
        ids, lengths = batch["input_ids"], batch["num_tokens"].tolist()
        n_labels = (batch["label_ids"] != IGNORE).sum(1).tolist()
        keys = [tuple(ids[i, :n].tolist()) for i, n in enumerate(lengths)]
        missing = torch.tensor([k not in self.entries for k in keys], device=ids.device)
        if missing.any():
            fresh = label_hidden(model, select_rows(batch, missing), prompt=None)
            for j, i in enumerate(missing.nonzero().flatten().tolist()):
                entry = fresh[j, : n_labels[i]].detach().clone()
                self.entries[keys[i]] = entry
                self.nbytes += entry.numel() * entry.element_size()
        self.misses += int(missing.sum())
        self.hits += len(keys) - int(missing.sum())
        K = batch["label_ids"].size(1)
        rows = [self.entries[k] for k in keys]
        return torch.stack([torch.cat([r, r.new_zeros(K - r.size(0), r.size(1))]) for r in rows])


class SpulObjective:
    """``loss_fn(model, batch) -> (loss, terms)`` for ``utils.training.train``.

    ``prompt_fn(model)`` gives the (p, d) prompt embeddings (with grad). The reference logits
    come from the same frozen model with no prompt, under no_grad, for the retain rows only
    (forget rows never enter L_kl), and are skipped when beta is 0. Records the time spent on
    the reference and the largest reference tensor held during one step.

    With ``prompt_cache`` (default) the prompt positions run once per step (batch 1) and the
    batch attends to their key/value cache (``utils.forward.PromptCache``, built with grad):
    the same logits and gradient as prepending the prompt to every row, for B*p fewer token
    positions in the forward and the backward. It falls back to prepending when the model
    checkpoints activations (which drops caches).

    ``fixed_prefix`` (spul.py ``--hard_prefix``): the (q, d) embeddings of fixed text rows that
    come before the soft prompt. They attend only to themselves and the model is frozen, so with
    the prompt cache their keys and values are computed once, without grad, on the first step,
    and each step runs only the p soft rows after them (``PromptCache.build(past=...)``): the
    same loss and gradient as prepending the q + p rows, for q fewer positions per step forward
    and backward. A frozen model with active dropout gets them rebuilt (still without grad) at
    every step, as the joined build would draw new dropout masks.

    With ``reference_cache`` (spul.py's default; off here unless asked) the reference of a
    retain sample is computed on its first visit only and then read back from a
    ``ReferenceHiddenCache``.

    Its terms follow ``batch["global_counts"]`` when the training loop sets them
    (``global_counts = True``: exact across processes and accumulation steps)."""

    global_counts = True  # utils.training.train: the loss normalises by the step's counts

    def __init__(self, prompt_fn, alpha: float, beta: float, prompt_cache: bool = True, reference_cache: bool = False,
                 fixed_prefix: torch.Tensor | None = None):
        self.prompt_fn, self.alpha, self.beta = prompt_fn, alpha, beta
        self.prompt_cache = prompt_cache
        self.fixed_prefix = fixed_prefix
        self._prefix_cache = None
        self._prefix_dropout = None
        self.prefix_builds = 0
        self.reference_cache = ReferenceHiddenCache() if reference_cache else None
        self.ref_seconds = 0.0
        self.ref_steps = 0
        self.ref_peak_bytes = 0
        self.step_seconds = 0.0
        self.steps = 0

    def reference(self, model, batch) -> torch.Tensor | None:
        retain = ~batch["is_forget"].bool()
        if not self.beta or not retain.any():
            return None
        t0 = time.perf_counter()
        with torch.no_grad(), one_thread(retain.device):  # see utils.invariant: no-grad forwards at 2 threads
            if self.reference_cache is not None:
                sub = head_logits(model, self.reference_cache.hidden(model, select_rows(batch, retain)))
            else:
                sub = label_logits(model, select_rows(batch, retain), prompt=None)
        ref = sub.new_zeros(retain.size(0), *sub.shape[1:])  # forget rows: never read
        ref[retain] = sub
        self.ref_seconds += time.perf_counter() - t0
        self.ref_steps += 1
        self.ref_peak_bytes = max(self.ref_peak_bytes, ref.element_size() * ref.nelement())
        return ref

    def __call__(self, model, batch):
        t0 = time.perf_counter()
        ref = self.reference(model, batch)
        soft = self.prompt_fn(model)
        if self.prompt_cache and cache_compatible(model) and not _sharded():
            cache = PromptCache.build(model, soft, past=self.prefix_cache(model, soft))
            logits = label_logits(model, batch, prompt_cache=cache)
        else:
            prompt = soft if self.fixed_prefix is None else join_prefix(self.fixed_prefix, soft)
            logits = label_logits(model, batch, prompt)
        loss, terms = spul_loss(logits, ref, batch, self.alpha, self.beta)
        self.step_seconds += time.perf_counter() - t0  # forward part; backward is in the loop
        self.steps += 1
        return loss, terms

    def prefix_cache(self, model, soft: torch.Tensor) -> PromptCache | None:
        """The fixed prefix's cache (None without one): built once, or at every step when the
        frozen model drops activations in training mode."""
        if self.fixed_prefix is None:
            return None
        if self._prefix_dropout is None:  # the frozen model's modules do not change: look once
            self._prefix_dropout = has_dropout(model)
        if self._prefix_cache is None or (model.training and self._prefix_dropout):
            with torch.no_grad(), one_thread(soft.device):
                self._prefix_cache = PromptCache.build(model, self.fixed_prefix.to(soft.device, soft.dtype))
            self.prefix_builds += 1
        return self._prefix_cache

    def cost(self) -> dict:
        """The measured cost of the KL reference."""
        cache = self.reference_cache
        strategy = "on the fly: same frozen model, prompt bypassed, torch.no_grad, retain rows only"
        if cache is not None:
            strategy += "; final hidden states at the label positions kept per sample after its first visit"
        return {
            "strategy": strategy,
            "reference_seconds_total": self.ref_seconds,
            "reference_seconds_per_step": self.ref_seconds / max(self.steps, 1),
            "steps": self.steps,
            "steps_with_reference": self.ref_steps,
            "reference_peak_bytes_per_step": self.ref_peak_bytes,
            "bytes_kept_between_steps": cache.nbytes if cache is not None else 0,
            "reference_cache_hits": cache.hits if cache is not None else None,
            "reference_cache_misses": cache.misses if cache is not None else None,
            "extra_model_copies": 0,
        }
