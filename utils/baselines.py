"""Fine-tuning unlearning baselines: one small loss per method, a registry, the frozen
reference they need, and saving/loading their run folders. The registry also holds three
training-free methods (``training_free``: no loss, no training), whose fixed hard-text prefix or
input filter comes from ``utils.guardrails``; their run folders hold the prefix (or the filter's
record in the manifest) and point to the model.

Every loss is a pure function ``(logits, batch, ref, weights) -> (loss, {term: float})`` on
label-position logits (B, K, V) (see ``utils.forward.label_logits``) and the batch fields
``label_ids`` and ``is_forget``; ``ref`` is a :class:`RefBatch` (the frozen pre-unlearning
model's view of the same samples) and ``weights`` a :class:`Weights`. Forget and retain samples
mix in the same shuffled batches; each term is averaged over its own samples in the batch and
is 0 when the batch has none (``masked_mean``). With ``batch["global_counts"]`` (set by
``utils.training.train`` for several processes or gradient accumulation) each term is instead
this batch's sum over its samples divided by their number in the whole optimiser step
(``utils.losses.global_count``), so that the terms of all forwards add up to the step's means.

The reference
-------------
GA+KL needs the frozen model's label distribution on retain samples and NPO its log-probability
of the true label sequence on forget samples. Full fine-tuning moves every weight, so the
reference is captured *before* training, in one no-grad pass over the samples that need it, and
kept in a :class:`ReferenceStore` keyed by sample index (the ``index`` field of a batch), so
shuffled batches look their entries up. No second model is ever held in memory:

- NPO: one fp32 log-probability per forget sample (exact).
- KL: per retain label position, the reference's top-k log-probabilities (fp16), their token
  ids (int32) and the log of the remaining tail mass (fp32). The KL is then taken between the
  two *coarse-grained* distributions over k+1 cells (the reference's top-k tokens, one cell
  each, and one cell for all other tokens):
  ``KL_k = sum_{i in top-k} p(i) log(p(i)/q(i)) + p(tail) log(p(tail)/q(tail))``, with ``p`` the
  reference and ``q`` the current model. By the log-sum inequality ``KL_k <= KL`` (the
  full-vocabulary KL(ref || cur)); they are equal when the current model's distribution over the
  tail tokens is proportional to the reference's (in particular at the start of training), and
  the gap is at most ``p(tail) * KL(p(.|tail) || q(.|tail))``. ``kl_topk=0`` stores the full
  fp32 log-distribution instead (exact, V*4 bytes per label position).

With ``--lora`` the reference is the same model with its adapter disabled (:class:`AdapterOffReference`):
exact, no cache, one extra no-grad forward per batch.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from utils import guardrails
from utils.forward import label_logits, to_device
from utils.loading import Loaded, LoadSource, load_merged, load_source_or_base
from utils.losses import ce_per_sample, global_count, kl_per_sample, masked_mean, sequence_logprob
from utils.models import load_model, load_tokenizer, set_pad_token_id, weights_hash
from utils.runs import TOKENIZER_DIR, RunError
from utils.template import IGNORE, collate

# ---------------------------------------------------------------------------------------------
# Reference distributions (what a loss sees of the frozen model for one batch)
# ---------------------------------------------------------------------------------------------


@dataclass
class FullDist:
    """The reference's full-vocabulary logits (or log-probs) at the label positions, (B, K, V)."""

    logits: torch.Tensor

    def kl(self, logits: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
        """KL(reference || current) per sample, averaged over its label tokens, (B,)."""
        return kl_per_sample(self.logits, logits, label_ids)


def coarse_kl(top_logp, top_idx, tail_logp, logits) -> torch.Tensor:
    """KL between the reference and current distributions coarse-grained to k+1 cells (the
    reference's top-k tokens and one tail cell), per position: inputs (..., k), (..., k),
    (...), (..., V); output (...). The stored reference cells are renormalised (fp16 rounding)."""
    cur = F.log_softmax(logits.float(), dim=-1)
    idx = top_idx.long()
    cur_top = cur.gather(-1, idx)
    cur_tail = torch.logsumexp(cur.scatter(-1, idx, float("-inf")), dim=-1)
    ref = F.log_softmax(torch.cat([top_logp.float(), tail_logp.float().unsqueeze(-1)], -1), dim=-1)
    q = torch.cat([cur_top, cur_tail.unsqueeze(-1)], -1)
    return (ref.exp() * (ref - q)).sum(-1)


@dataclass
class TopKDist:
    """Compact reference: top-k log-probs (B, K, k), their ids (B, K, k), tail log-mass (B, K)."""

    top_logp: torch.Tensor
    top_idx: torch.Tensor
    tail_logp: torch.Tensor

    def kl(self, logits: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
        per_pos = coarse_kl(self.top_logp, self.top_idx, self.tail_logp, logits)
        valid = (label_ids != IGNORE).float()
        return (per_pos * valid).sum(1) / valid.sum(1).clamp(min=1)


@dataclass
class RefBatch:
    """The frozen model on one batch: ``logprob`` (B,) = log pi_ref(y|x) of the batch's label
    sequences (needed on forget samples), ``dist`` its label-position distribution (retain)."""

    logprob: torch.Tensor | None = None
    dist: FullDist | TopKDist | None = None


class Weights:
    """What a loss is weighted and tuned by: ``retain``, the weight of the retain term (CE or
    KL; 0 drops it), and each method's own hyperparameters by flag name (``Method.hparams``),
    read as attributes (``weights.npo_beta``)."""

    def __init__(self, retain: float = 1.0, **params: float):
        self.retain = float(retain)
        self.params = dict(params)

    def __getattr__(self, name):
        params = self.__dict__.get("params", {})
        if name in params:
            return params[name]
        raise AttributeError(f"Weights has no {name!r} (not a hyperparameter of this method)")

    def __repr__(self):
        return f"Weights(retain={self.retain}, {self.params})"


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def _forget_mean(values, batch):
    """Mean of per-sample ``values`` over the forget samples (of the step, with global counts)."""
    return masked_mean(values, batch["is_forget"], global_count(batch, "forget"))


def _retain_mean(values, batch):
    """Mean of per-sample ``values`` over the retain samples (of the step, with global counts)."""
    return masked_mean(values, ~batch["is_forget"], global_count(batch, "retain"))


def _forget_ce(logits, batch):
    return _forget_mean(ce_per_sample(logits, batch["label_ids"]), batch)


def gradient_ascent(logits, batch, ref, weights):
    """-CE(true label) on forget samples."""
    ce = _forget_ce(logits, batch)
    return -ce, {"forget_ce": ce.item()}


def random_label(logits, batch, ref, weights):
    """CE toward the generic label on forget samples (``label_ids`` already hold it)."""
    ce = _forget_ce(logits, batch)
    return ce, {"forget_ce_generic": ce.item()}


def random_label_descent(logits, batch, ref, weights):
    """CE toward the generic label on forget samples + w * CE on retain samples (+ kl_weight *
    KL(reference || current) on retain samples when kl_weight > 0): SPUL's L_f + alpha L_r + beta
    L_kl, trained on the weights instead of a prompt."""
    ce = _forget_ce(logits, batch)
    rce = _retain_mean(ce_per_sample(logits, batch["label_ids"]), batch)
    terms = {"forget_ce_generic": ce.item(), "retain_ce": rce.item()}
    loss = ce + weights.retain * rce
    if weights.kl_weight > 0:
        kl = _retain_mean(ref.dist.kl(logits, batch["label_ids"]), batch) if ref.dist is not None else logits.new_zeros(())
        loss = loss + weights.kl_weight * kl
        terms["retain_kl"] = kl.item()
    return loss, terms


def gradient_ascent_kl(logits, batch, ref, weights):
    """-CE on forget samples + w * KL(reference || current) on retain samples."""
    ce = _forget_ce(logits, batch)
    # no distribution when the KL weight is 0 (then the method trains on the forget set only)
    kl = _retain_mean(ref.dist.kl(logits, batch["label_ids"]), batch) if ref.dist is not None else logits.new_zeros(())
    return -ce + weights.retain * kl, {"forget_ce": ce.item(), "retain_kl": kl.item()}


def gradient_ascent_descent(logits, batch, ref, weights):
    """-CE on forget samples + w * CE on retain samples."""
    ce = _forget_ce(logits, batch)
    rce = _retain_mean(ce_per_sample(logits, batch["label_ids"]), batch)
    return -ce + weights.retain * rce, {"forget_ce": ce.item(), "retain_ce": rce.item()}


def npo_per_sample(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """(2/beta) * log(1 + (pi/pi_ref)^beta) = -(2/beta) * logsigmoid(-beta * (logp - ref_logp))."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp.to(logp.dtype)))


def npo(logits, batch, ref, weights):
    """NPO on forget samples (y = the true label sequence) + w * CE on retain samples."""
    forget = batch["is_forget"]
    logp = sequence_logprob(logits, batch["label_ids"])
    ref_logp = torch.where(forget, ref.logprob, logp.detach())  # entries exist for forget samples only
    loss_f = _forget_mean(npo_per_sample(logp, ref_logp, weights.npo_beta), batch)
    rce = _retain_mean(ce_per_sample(logits, batch["label_ids"]), batch)
    return loss_f + weights.retain * rce, {"forget_npo": loss_f.item(), "retain_ce": rce.item()}


def simnpo_per_sample(logp: torch.Tensor, length: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimNPO's reference-free forget loss: -(2/beta) * logsigmoid(-(beta/|y|) * log pi(y|x) - gamma)."""
    return -(2.0 / beta) * F.logsigmoid(-(beta / length.to(logp.dtype)) * logp - gamma)


def simnpo(logits, batch, ref, weights):
    """SimNPO (Fan et al. 2024) on forget samples (y = the true label sequence, its
    log-probability normalised by its length, margin gamma; no reference model) + w * CE on
    retain samples."""
    logp = sequence_logprob(logits, batch["label_ids"])
    length = (batch["label_ids"] != IGNORE).sum(1).clamp(min=1)
    loss_f = _forget_mean(simnpo_per_sample(logp, length, weights.simnpo_beta, weights.simnpo_gamma), batch)
    rce = _retain_mean(ce_per_sample(logits, batch["label_ids"]), batch)
    return loss_f + weights.retain * rce, {"forget_simnpo": loss_f.item(), "retain_ce": rce.item()}


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HParam:
    """A method's own hyperparameter: ``baselines.py`` gets a ``--NAME`` flag for it (float),
    checks it, passes it to the loss as ``weights.NAME``, records it in the manifest's
    ``loss_weights`` and lets the selection grid vary it (``utils.select``)."""

    default: float
    help: str
    minimum: float = 0.0
    inclusive: bool = False  # False: the value must be > minimum; True: >= minimum

    def check(self, name: str, value: float) -> str | None:
        ok = value >= self.minimum if self.inclusive else value > self.minimum
        if ok:
            return None
        bound = f">= {self.minimum:g}" if self.inclusive else ("positive" if self.minimum == 0 else f"> {self.minimum:g}")
        return f"--{name} {value:g}: must be {bound}"


@dataclass(frozen=True)
class Method:
    """One baseline: its loss, its report name, its own hyperparameters, and what it trains on
    and needs. Adding a method is one entry here (and its loss above).

    Retain samples are in the training set iff the method has a retain term and its weight
    is > 0 (GA and RL see only the forget set, as in the paper)."""

    loss: Callable | None
    help: str
    display: str  # its row name in the report
    retain_term: str | None = None  # name of the weighted retain/KL term, None if none
    default_weight: float = 0.0  # default of --retain_weight
    relabel_forget: bool = False  # forget samples carry generic labels
    ref_logprob: bool = False  # needs log pi_ref(y|x) on forget samples
    ref_dist: bool = False  # needs the reference label distribution on retain samples
    kl_gate: str | None = None  # with ref_dist: the hyperparameter whose value > 0 switches the KL (and the need) on
    # training-free (no loss, no training): ``prefix(GuardrailOptions, splits, task) -> Guardrail`` (utils.guardrails)
    # builds the hard-text prefix placed before every input, or the input filter; the run saves no weights
    training_free: bool = False
    prefix: Callable | None = None
    flags: tuple[str, ...] = ()  # the method-specific flags it reads (--forget_names, --icl_*)
    hparams: dict = field(default_factory=dict)  # flag name -> HParam

    def trains_on_retain(self, weight: float) -> bool:
        return self.retain_term is not None and weight > 0

    def needs_dist(self, weights: "Weights") -> bool:
        """Whether the loss reads the reference's label distribution on retain samples."""
        if not (self.ref_dist and self.trains_on_retain(weights.retain)):
            return False
        return self.kl_gate is None or getattr(weights, self.kl_gate) > 0

    def needs_reference(self, weights: "Weights") -> bool:
        return self.ref_logprob or self.needs_dist(weights)


METHODS: dict[str, Method] = {
    "gradient_ascent": Method(gradient_ascent, "GA: minus the CE of the true label on forget samples (forget set only)", "GA"),
    "random_label": Method(
        random_label, "RL: CE toward a seeded generic label (the task's, e.g. neutral/unknown) on forget samples (forget set only)",
        "RL", relabel_forget=True,
    ),
    "random_label_descent": Method(
        random_label_descent,
        "RL+GD: CE toward a generic label on forget samples + w * retain CE (+ kl_weight * KL(reference || current) "
        "on retain samples) (forget + retain; SPUL's L_f + alpha L_r + beta L_kl on the weights; with "
        "--counterfactual_retain, --pseudo_retain and --generic_label it trains on SPUL's data)",
        "RL+GD", retain_term="CE", default_weight=1.0, relabel_forget=True, ref_dist=True, kl_gate="kl_weight",
        hparams={"kl_weight": HParam(0.0, "weight of the KL(reference || current) term on retain samples, SPUL's beta "
                                          "(>= 0; 0: no KL term and no reference)", inclusive=True)},
    ),
    "gradient_ascent_kl": Method(
        gradient_ascent_kl,
        "GA+KL: minus forget CE + w * KL(reference || current) at the label position of retain samples (forget + retain)",
        "GA+KL", retain_term="KL", default_weight=1.0, ref_dist=True,
    ),
    "gradient_ascent_descent": Method(
        gradient_ascent_descent, "GA+GD: minus forget CE + w * retain CE (forget + retain)",
        "GA+GD", retain_term="CE", default_weight=1.0,
    ),
    "npo": Method(
        npo,
        "NPO (Zhang et al. 2024): (2/beta) log(1 + (pi(y|x)/pi_ref(y|x))^beta) on forget samples, "
        "+ w * retain CE (default w=0: plain NPO on the forget set; w>0 is NPO+RT)",
        "NPO", retain_term="CE", default_weight=0.0, ref_logprob=True,
        hparams={"npo_beta": HParam(0.1, "NPO's beta (inverse temperature; > 0)")},
    ),
    "simnpo": Method(
        simnpo,
        "SimNPO (Fan et al. 2024): NPO without a reference model, -(2/beta) log sigmoid(-(beta/|y|) log pi(y|x) - gamma) "
        "on forget samples, + w * retain CE (default w=0: forget set only)",
        "SimNPO", retain_term="CE", default_weight=0.0,
        hparams={"simnpo_beta": HParam(2.5, "SimNPO's beta (inverse temperature; > 0)"),
                 "simnpo_gamma": HParam(0.0, "SimNPO's reward margin gamma (>= 0)", inclusive=True)},
    ),
    "instruction_prompt": Method(
        None,
        "guardrail prompt (Thaker et al. 2024): a fixed instruction before every input, naming the forgotten "
        "people (--forget_names, or the entities split's manifest) and asking for the generic label "
        f"'{guardrails.INSTRUCTION_LABEL}' for texts about them",
        "Instruction prompt", training_free=True, prefix=guardrails.instruction_guardrail, flags=("forget_names",),
    ),
    "in_context": Method(
        None,
        "in-context unlearning (Pawelczyk et al. 2024): a fixed context of --icl_forget train_forget examples "
        "with generic labels and --icl_retain class-balanced train_retain examples with their true labels, "
        "seeded, before every input (--icl_draws N: the best of N seeded draws on validation data)",
        "In-context unlearning", training_free=True, prefix=guardrails.in_context_guardrail,
        flags=("icl_forget", "icl_retain", "icl_draws"),
    ),
    "name_filter": Method(
        None,
        "input filter (Thaker et al. 2024): every input naming a forgotten person (--forget_names, or the entities "
        f"split's manifest; whole words, any case) is answered with the generic label '{guardrails.INSTRUCTION_LABEL}' "
        "without the model; other inputs go to the model unchanged",
        "Name filter", training_free=True, prefix=guardrails.name_filter_guardrail, flags=("forget_names",),
    ),
}


def hparam_flags() -> dict[str, tuple[HParam, list[str]]]:
    """Every method hyperparameter flag, with the methods that read it."""
    out: dict[str, tuple[HParam, list[str]]] = {}
    for name, method in METHODS.items():
        for flag, spec in method.hparams.items():
            out.setdefault(flag, (spec, []))[1].append(name)
    return out


def method_weights(method: Method, retain: float, given: dict) -> Weights:
    """The method's weights: ``retain`` and its hyperparameters (``given`` by flag name, else
    their defaults)."""
    return Weights(retain, **{k: (given.get(k) if given.get(k) is not None else spec.default) for k, spec in method.hparams.items()})


def methods_help() -> str:
    return "; ".join(f"{name}{' (training-free)' if m.training_free else ''}: {m.help}" for name, m in METHODS.items())


def select_features(method: Method, features: list[dict], weight: float) -> list[dict]:
    """The samples a method trains on, each tagged with its ``index`` in the returned list."""
    keep = [f for f in features if f["is_forget"] or method.trains_on_retain(weight)]
    return [{**f, "index": i} for i, f in enumerate(keep)]


# ---------------------------------------------------------------------------------------------
# Reference store (full fine-tuning) and adapter-off reference (--lora)
# ---------------------------------------------------------------------------------------------


@dataclass
class ReferenceStore:
    """What the losses need of the frozen model, captured before training, keyed by sample
    index. Entries live in compact row tensors; ``row[index]`` is -1 for samples without one."""

    n: int
    logprob: torch.Tensor | None = None  # (N,) fp32, forget samples
    dist_row: torch.Tensor | None = None  # (N,) row into the distribution tensors, retain samples
    top_logp: torch.Tensor | None = None  # (R, K, k) fp16
    top_idx: torch.Tensor | None = None  # (R, K, k) int32
    tail_logp: torch.Tensor | None = None  # (R, K) fp32
    full_logp: torch.Tensor | None = None  # (R, K, V) fp32 when kl_topk == 0
    stats: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        tensors = (self.logprob, self.dist_row, self.top_logp, self.top_idx, self.tail_logp, self.full_logp)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def lookup(self, model, batch) -> RefBatch:
        index = batch["index"].cpu()
        if (index < 0).any() or (index >= self.n).any():
            raise RuntimeError("reference lookup: batch samples carry no valid 'index'")
        device = batch["label_ids"].device
        out = RefBatch()
        if self.logprob is not None:
            out.logprob = self.logprob[index].to(device)
        if self.dist_row is not None:
            rows = self.dist_row[index]
            if (rows[~batch["is_forget"].cpu()] < 0).any():
                raise RuntimeError("reference lookup: a retain sample has no stored distribution")
            rows = rows.clamp(min=0)  # forget samples get filler rows; the KL term masks them out
            k = batch["label_ids"].size(1)  # the store holds the longest label of the training set
            if self.full_logp is not None:
                out.dist = FullDist(self.full_logp[rows, :k].to(device))
            else:
                out.dist = TopKDist(*(t[rows, :k].to(device) for t in (self.top_logp, self.top_idx, self.tail_logp)))
        return out


def _length_order(features, idx):
    return sorted(idx, key=lambda i: -len(features[i]["input_ids"]))


@torch.inference_mode()
def build_reference_store(model, method: Method, features, batch_size, device, pad_id, kl_topk=64,
                          weights: Weights | None = None) -> ReferenceStore:
    """One no-grad pass over the samples whose entries ``method`` needs (its forget samples
    for NPO, its retain samples for GA+KL and RL+GD's KL), with the model as it is now
    (pre-unlearning). ``weights``: the run's (default: retain weight 1, the method's defaults)."""
    weights = weights if weights is not None else method_weights(method, 1.0, {})
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    n = len(features)
    store = ReferenceStore(n)
    forget_idx = [i for i, f in enumerate(features) if f["is_forget"]]
    retain_idx = [i for i, f in enumerate(features) if not f["is_forget"]]
    want_dist = method.needs_dist(weights)
    if method.ref_logprob:
        store.logprob = torch.zeros(n, dtype=torch.float32)
    if want_dist:
        store.dist_row = torch.full((n,), -1, dtype=torch.long)
        store.dist_row[retain_idx] = torch.arange(len(retain_idx))
        K = max(len(f["label_ids"]) for f in features)
    passes = (forget_idx if method.ref_logprob else []), (retain_idx if want_dist else [])
    todo = _length_order(features, sorted(set(passes[0]) | set(passes[1])))
    parts = []
    for s in range(0, len(todo), batch_size):
        idx = todo[s : s + batch_size]
        batch = to_device(collate([features[i] for i in idx], pad_id), device)
        logits = label_logits(model, batch)
        if store.logprob is not None:
            store.logprob[idx] = sequence_logprob(logits, batch["label_ids"]).float().cpu()
        if want_dist:
            parts.append((idx, _compress(logits, K, kl_topk)))
    if want_dist:
        _fill_dist(store, parts, len(retain_idx), K, kl_topk)
    model.train(was_training)
    store.stats = {
        "kind": "cache",
        "entries_logprob": len(passes[0]),
        "entries_distribution": len(passes[1]),
        "kl_topk": kl_topk if want_dist else None,
        "bytes": store.nbytes(),
        "seconds": time.perf_counter() - t0,
    }
    return store


def _compress(logits, K, kl_topk):
    """Per label position: (top log-probs fp16, ids int32, tail log-mass fp32) or full fp32 log-probs."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if logp.size(1) < K:  # pad label positions to the store's K
        logp = torch.cat([logp, logp.new_zeros(logp.size(0), K - logp.size(1), logp.size(2))], 1)
    if kl_topk == 0:
        return (logp.cpu(),)
    k = min(kl_topk, logp.size(-1) - 1)  # at least one token stays in the tail cell
    top, ids = logp.topk(k, dim=-1)
    tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)
    return top.half().cpu(), ids.int().cpu(), tail.float().cpu()


def _fill_dist(store, parts, R, K, kl_topk):
    rows = lambda idx: store.dist_row[idx]  # noqa: E731
    if kl_topk == 0:
        V = parts[0][1][0].size(-1) if parts else 1
        store.full_logp = torch.zeros(R, K, V)
        for idx, (full,) in parts:
            store.full_logp[rows(idx)] = full
        return
    k = parts[0][1][0].size(-1) if parts else 1
    store.top_logp = torch.zeros(R, K, k, dtype=torch.float16)
    store.top_idx = torch.zeros(R, K, k, dtype=torch.int32)
    store.tail_logp = torch.zeros(R, K)
    for idx, (top, ids, tail) in parts:
        store.top_logp[rows(idx)], store.top_idx[rows(idx)], store.tail_logp[rows(idx)] = top, ids, tail


class AdapterOffReference:
    """The frozen model as the same PEFT model with its adapter disabled: exact, no cache."""

    stats = {"kind": "adapter_off", "bytes": 0, "seconds": 0.0}

    def lookup(self, model, batch) -> RefBatch:
        t0 = time.perf_counter()
        with torch.no_grad(), model.disable_adapter():
            ref = label_logits(model, batch)
        self.stats = {**self.stats, "seconds": self.stats["seconds"] + time.perf_counter() - t0}
        return RefBatch(logprob=sequence_logprob(ref, batch["label_ids"]), dist=FullDist(ref))


class NoReference:
    stats = {"kind": None, "bytes": 0, "seconds": 0.0}

    def lookup(self, model, batch) -> RefBatch:
        return RefBatch()


def make_loss_fn(method: Method, reference, weights: Weights):
    """``loss_fn(model, batch)`` for ``utils.training.train``."""

    def loss_fn(model, batch):
        ref = reference.lookup(model, batch)
        return method.loss(label_logits(model, batch), batch, ref, weights)

    loss_fn.global_counts = True  # every method's terms follow batch["global_counts"]
    return loss_fn


def nonfinite_parameters(params) -> list[str]:
    return [name for name, p in params if not torch.isfinite(p).all()]


# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------


def save_unlearned(tmp: Path, model, lora: bool, qlora_run: Path | None) -> dict:
    """Write the unlearned weights (``model/``: safetensors + HF config) or, with LoRA, the
    unlearning adapter (``adapter/``) plus a copy of the QLoRA adapter it sits on
    (``qlora_adapter/``), so the run folder is self-contained. Returns hashes for the manifest."""
    if not lora:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        return {"weights": "model", "unlearned_weights_sha256": weights_hash(tmp / "model")}
    model.save_pretrained(tmp / "adapter")
    out = {"weights": "adapter", "unlearn_adapter_sha256": weights_hash(tmp / "adapter")}
    if qlora_run is not None:
        shutil.copytree(Path(qlora_run) / "adapter", tmp / "qlora_adapter")
        out["qlora_adapter_copy_sha256"] = weights_hash(tmp / "qlora_adapter")
    return out


def _load_training_free(run_dir: Path, manifest: dict, tokenizer, device, load_source: LoadSource) -> Loaded:
    """The model the run started from (its QLoRA run merged, or the pre-trained model) with the
    run's prefix as prompt embeddings (``Loaded.prompt``) or its input filter
    (``Loaded.input_filter``); ``inference_spul.py --no_prompt`` drops either."""
    text = guardrails.read_prefix(run_dir, manifest["saved"], tokenizer) if "prefix" in manifest["saved"] else None
    record = manifest.get("guardrail") or {}
    source = load_source_or_base(manifest, device, load_source)
    set_pad_token_id(source.model, tokenizer.pad_token_id)
    prompt = guardrails.prefix_embeddings(source.model, tokenizer, text) if text is not None else None
    input_filter = guardrails.NameFilter.from_record(record) if record.get("filter") == "names" else None
    return Loaded(source.model.eval(), tokenizer, manifest, source.model_path, prompt=prompt, input_filter=input_filter)


def load_baseline(run_dir: Path, manifest: dict, device, load_source: LoadSource) -> Loaded:
    """A baseline run folder -> the unlearned model (full precision, adapters merged), or for a
    training-free run the model it points to with its prefix as ``prompt``."""
    run_dir = Path(run_dir)
    tokenizer = load_tokenizer(run_dir / TOKENIZER_DIR)
    saved = manifest["saved"]
    if saved["weights"] is None:
        return _load_training_free(run_dir, manifest, tokenizer, device, load_source)
    if saved["weights"] == "model":
        if weights_hash(run_dir / "model") != saved["unlearned_weights_sha256"]:
            raise RunError(f"--model_checkpoints {run_dir}: model weights do not match the manifest hash")
        model, _ = load_model(run_dir / "model", device, tokenizer=tokenizer)
        return Loaded(model.eval(), tokenizer, manifest, manifest["base_model_path"])
    if weights_hash(run_dir / "adapter") != saved["unlearn_adapter_sha256"]:
        raise RunError(f"--model_checkpoints {run_dir}: adapter does not match the manifest hash")
    adapters = [run_dir / "qlora_adapter"] if (run_dir / "qlora_adapter").is_dir() else []
    model, model_path = load_merged(manifest["base_model"], adapters + [run_dir / "adapter"], device, tokenizer)
    return Loaded(model.eval(), tokenizer, manifest, model_path)


# what a baseline manifest adds to utils.runs.run_manifest's
MANIFEST_FIELDS = ("method", "training_free", "prefix", "guardrail", "loss_weights", "lora", "qlora_run",
                   "qlora_adapter_sha256", "qlora_base_weights_sha256", "reference", "saved")


def display(manifest: dict) -> str:
    """The report's row name of a baseline run: its method's."""
    method = METHODS.get(manifest.get("method"))
    return method.display if method else str(manifest.get("method"))
