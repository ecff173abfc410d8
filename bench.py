#!/usr/bin/env python
"""Benchmark the cost of SPUL against QLoRA and the fine-tuning unlearning baselines, in one
process, on one model, one data set and one batch shape. Prints a table and writes JSON:

- training step time and training tokens/s of QLoRA, SPUL and every baseline of the registry
  (GA, RL, GA+KL, GA+GD, NPO), timed round-robin on the same batches (median over --steps);
- the release-style SPUL step (``ReleaseStyleSpul``: the same loss computed the way the paper's
  public release computes it: PEFT's own forward with the prompt prepended to every row, full
  logits at every position, the KL reference read from logits precomputed by a second model
  copy), the peer every SPUL figure is reported against: step time, FLOPs, and peak memory
  with the copy and the reference cache counted;
- evaluation throughput with logits at the label-predicting positions only, against a naive
  forward that computes full-vocabulary logits at every position;
- bytes kept for the GA+KL / NPO reference, against a full-vocabulary fp32 cache of every
  training example (n_train x vocab x 4);
- peak memory of a SPUL training run (utils.training.train), against one copy of the model's
  weights (CPU: peak resident set size above the process before the model was loaded; CUDA:
  peak allocated memory);
- achieved FLOP/s of the SPUL step (matmul and attention FLOPs of forward and backward,
  counted with torch.utils.flop_counter on the timed batches) and of the label-position
  evaluation forward, against a dense-matmul peak measured in the same process, same dtype and
  threads;
- inference with the soft prompt (through its key/value cache, and prepended to every row)
  against inference without it;

then every target of the performance issue with the achieved ratio and met / not met.
--levers also measures the other levers (threads, torch.inference_mode, length-grouped
batches, gradient checkpointing, bf16 on CPU, GQA inside SDPA). --profile replaces the
benchmark by a torch.profiler breakdown (matmul, LM head, attention, norm, element-wise,
optimizer, other ops, Python/framework overhead) of one SPUL step, one GA+GD step and one
evaluation forward (see the "Profile" section below).

The full fine-tuning baselines share one model copy and one AdamW state (a step's cost does
not depend on the weights' values), so that all methods fit in memory and run interleaved:
contention from other processes then falls on every method alike."""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from utils import cli
from utils.baselines import METHODS, NoReference, build_reference_store, make_loss_fn, method_weights
from utils.data import encode_frame, prepare_splits, training_set
from utils.evaluation import length_batches
from utils.forward import PromptCache, backbone, full_logits_at_labels, gather_label_logits, label_logits, to_device, unwrap
from utils.lean_mlp import lean_mlps
from utils.models import (
    add_lora,
    compute_dtype,
    load_model,
    load_tokenizer,
    lora_config,
    lora_target_modules,
    prepare_for_training,
    resolve_model,
    select_device,
    set_pad_token_id,
)
from utils.prompt import add_prompt, join_prefix, prompt_embeddings, trainable_parameters
from utils.qlora_run import label_ce
from utils.spul_loss import SpulObjective, spul_loss
from utils.template import Encoder, collate
from utils.training import TrainConfig, epoch_batches, seed_everything, train

# each entry point's default learning rate and clipping (they do not change a step's cost)
LR = {"qlora": 1e-4, "spul": 1e-4, "baseline": 1e-5}
WEIGHT_DECAY, MAX_GRAD_NORM = 0.001, 0.3


def build_parser():
    p = cli.parser(__doc__)
    cli.add_data_args(p)
    cli.add_model_args(p)
    g = p.add_argument_group("batch shape and repetitions")
    g.add_argument("--batch_size", type=int, default=8, help="examples per training step, the same for every method")
    g.add_argument("--eval_batch_size", type=int, default=None, help="examples per evaluation forward (default: --batch_size)")
    g.add_argument("--steps", type=int, default=3, help="timed training steps per method (round-robin over the methods, each round on a new batch)")
    g.add_argument("--warmup_steps", type=int, default=1, help="untimed training steps per method before timing")
    g.add_argument("--memory_steps", type=int, default=None, help="SPUL steps of the peak-memory training run (default: --steps)")
    g.add_argument("--eval_batches", type=int, default=3, help="evaluation batches per timed pass")
    g.add_argument("--eval_rounds", type=int, default=2, help="timed passes per evaluation path (interleaved)")
    g.add_argument("--flop_steps", type=int, default=1, help="timed SPUL and GA+GD steps whose FLOPs are counted, in a separate untimed pass (achieved FLOP/s = their FLOPs / their timed seconds)")
    g.add_argument("--quick", action="store_true", help="smoke run: 1 step per figure, 1 eval batch, small matmul (for tests on a tiny model)")
    g = p.add_argument_group("methods")
    g.add_argument("--ptuning_num_tokens", type=int, default=30, help="SPUL: number p of virtual tokens")
    g.add_argument("--ptuning_hidden_size", type=int, default=128, help="SPUL: hidden size of the prompt encoder's MLP")
    g.add_argument("--prefix_tokens", type=int, default=0, metavar="Q", help="SPUL: also time the step behind Q fixed prefix rows (spul.py --hard_prefix; its instruction on rt is 136 tokens), with the prefix's cache built once and with the prefix joined to the prompt at every step; 0 (default): off")
    g.add_argument("--alpha", type=float, default=1.0, help="SPUL: weight of the retain CE")
    g.add_argument("--beta", type=float, default=0.5, help="SPUL: weight of the KL term (0 skips the reference forward)")
    g.add_argument("--kl_topk", type=int, default=64, help="GA+KL: top-k log-probs kept per label position by the reference store")
    g.add_argument("--npo_beta", type=float, default=0.1, help="NPO's beta")
    g.add_argument("--lora_rank", type=int, default=16, help="QLoRA: LoRA rank")
    g.add_argument("--no_quantize", action="store_true", help="QLoRA row: LoRA on the full-precision model instead of 4-bit NF4")
    g = p.add_argument_group("machine")
    g.add_argument("--matmul_size", type=int, default=None, help="n of the n x n x n matmul that measures the peak (default 2048 on CPU, 8192 on CUDA)")
    g.add_argument("--levers", action="store_true", help="also measure the other levers (threads, inference_mode, length grouping, gradient checkpointing, bf16 on CPU, GQA in SDPA)")
    g.add_argument("--compile_lever", action="store_true", help="also measure torch.compile on the SPUL step (each decoder layer compiled, dynamic shapes): the first step with its compile time, then compiled and eager steps in turn on the timed batches (compiling takes 20-70 s on a CPU)")
    g = p.add_argument_group("profile")
    g.add_argument("--profile", action="store_true",
                   help="instead of the benchmark: torch.profiler over one SPUL step (--batch_size), one GA+GD step "
                        "(--profile_baseline_batch_size) and one evaluation forward (--eval_batch_size), broken into matmul, "
                        "LM head, attention, norm, element-wise, optimizer, other ops and overhead; writes JSON and a markdown table")
    g.add_argument("--profile_baseline_batch_size", type=int, default=None, help="--profile: examples per GA+GD step (default: --batch_size)")
    g = p.add_argument_group("output")
    g.add_argument("--targets", default=str(TARGETS_FILE), help="JSON file of the targets checked (each a ratio of two figures of the results)")
    g.add_argument("--out", default=None, help="JSON file to write (default: runs/bench/<model>-<dataset>.json, with --profile "
                                                "runs/bench/<model>-<dataset>-profile.json; the profile's markdown table goes next to it, .md)")
    return p


def check_args(args) -> None:
    args.eval_batch_size = args.eval_batch_size or args.batch_size
    args.profile_baseline_batch_size = args.profile_baseline_batch_size or args.batch_size
    cli.check_common(args)
    if args.quick:
        args.steps, args.warmup_steps, args.memory_steps, args.eval_batches, args.eval_rounds = 1, 0, 1, 1, 1
        args.matmul_size = args.matmul_size or 256
    args.memory_steps = args.memory_steps or args.steps
    args.flop_steps = min(args.flop_steps, args.steps)
    positive = ("batch_size", "eval_batch_size", "steps", "memory_steps", "eval_batches", "eval_rounds", "ptuning_num_tokens",
                "ptuning_hidden_size", "lora_rank", "flop_steps", "profile_baseline_batch_size")
    for name in positive:
        if getattr(args, name) < 1:
            raise cli.UsageError(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.prefix_tokens < 0:
        raise cli.UsageError(f"--prefix_tokens {args.prefix_tokens}: must be >= 0")
    if args.warmup_steps < 0 or args.kl_topk < 0 or args.alpha < 0 or args.beta < 0 or args.npo_beta <= 0:
        raise cli.UsageError("--warmup_steps, --kl_topk, --alpha, --beta must be >= 0 and --npo_beta > 0")


# ---------------------------------------------------------------------------------------------
# Clocks, memory, FLOPs
# ---------------------------------------------------------------------------------------------


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    return kb * 1024 if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory over a block. CUDA: peak allocated bytes (reset at the start). CPU: the
    peak resident set size (VmHWM, reset at the start through /proc/self/clear_refs; where
    that is impossible, the process's lifetime peak, flagged ``lifetime``)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.start = self.peak = 0
        self.lifetime = False

    @property
    def delta(self) -> int:
        """Peak above what was held when the block started."""
        return self.peak - self.start

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = rss_bytes()
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.lifetime = True
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            kb = None if self.lifetime else _status_kb("VmHWM")
            self.lifetime = kb is None
            self.peak = kb * 1024 if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return False


class SavedActivations:
    """Wraps a ``loss_fn`` and records, per call, the bytes of the tensors autograd saves for
    the backward pass (unique storages, the model's own weights excluded): the activation
    memory of a step, independent of the allocator."""

    def __init__(self, loss_fn, model):
        self.loss_fn = loss_fn
        self.weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        self.per_step = []

    def __call__(self, model, batch):
        seen, total = set(self.weights), [0]

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total[0] += t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = self.loss_fn(model, batch)
        self.per_step.append(total[0])
        return out


def model_bytes(module) -> int:
    """Bytes of one copy of a model's weights: parameters and buffers, shared storage once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter():
    """torch's FLOP counter (mm, addmm, bmm, SDPA forward and backward), plus the CPU flash
    attention kernels it does not know."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    extra = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward)):
        if hasattr(aten, name):
            extra[getattr(aten, name)] = fn
    return FlopCounterMode(display=False, custom_mapping=extra)


def matmul_peak(n: int, dtype, device, repeats: int = 3) -> float:
    """Best FLOP/s of an n x n x n matmul in ``dtype`` on ``device``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = min(timed(lambda: a @ b, device)[0] for _ in range(repeats))
    return 2 * n**3 / best


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def draw_batches(is_forget: list[bool], batch_size: int, count: int, seed: int) -> list[list[int]]:
    """``count`` batches of ``batch_size`` training examples with the training set's forget share
    (at least one forget and one retain example each when the batch has room), drawn from
    seeded permutations of each side (cycled when exhausted): every batch has the expected
    composition, and GA/NPO always have forget samples and GA+KL retain samples to work on."""
    forget = [i for i, f in enumerate(is_forget) if f]
    retain = [i for i, f in enumerate(is_forget) if not f]
    if not forget or not retain:
        raise cli.UsageError("the training set needs both forget and retain examples")
    share = len(forget) / len(is_forget)
    n_forget = min(max(1, round(batch_size * share)), max(batch_size - 1, 1))
    rng = np.random.default_rng([seed, 5])
    streams = {"forget": (forget, []), "retain": (retain, [])}

    def take(side, k):
        pool, buf = streams[side]
        while len(buf) < k:
            buf += rng.permutation(pool).tolist()
        out, streams[side] = buf[:k], (pool, buf[k:])
        return out

    batches = []
    for _ in range(count):
        rows = take("forget", n_forget) + take("retain", batch_size - n_forget)
        batches.append([rows[i] for i in rng.permutation(len(rows))])
    return batches


@dataclass
class Data:
    """Per-round training batches over a bench training set (each sample tagged with its
    ``index``), in two labelings: true labels, and generic labels for forget samples."""

    plain: list[dict]
    generic: list[dict]
    batches: list[list[int]]  # indices into plain/generic, one batch per round
    eval_feats: list[dict]
    eval_batches: list[list[int]]
    vocab_size: int = 0  # the model's output vocabulary, set once the model is loaded
    n_train_full: int = 0  # examples of the whole training set (not only the bench's rows)
    label_tokens_full: int = 0  # label tokens over the whole training set

    def features(self, relabel_forget: bool) -> list[dict]:
        return self.generic if relabel_forget else self.plain


def build_data(args, encoder, splits) -> Data:
    plain_all = training_set(encoder, splits, args.seed)
    generic_all = training_set(encoder, splits, args.seed, relabel_forget=True)
    rounds = args.warmup_steps + args.steps
    drawn = draw_batches([f["is_forget"] for f in plain_all], args.batch_size, rounds, args.seed)
    order = [i for b in drawn for i in b]
    plain = [{**plain_all[i], "index": k} for k, i in enumerate(order)]
    generic = [{**generic_all[i], "index": k} for k, i in enumerate(order)]
    batches = [list(range(r * args.batch_size, (r + 1) * args.batch_size)) for r in range(rounds)]
    test = encode_frame(encoder, splits["test_retain"], is_forget=False)
    n_eval = min(len(test), args.eval_batches * args.eval_batch_size)
    pick = np.random.default_rng([args.seed, 11]).choice(len(test), n_eval, replace=False)
    eval_feats = [test[i] for i in sorted(pick)]
    return Data(plain, generic, batches, eval_feats, length_batches(eval_feats, args.eval_batch_size),
                n_train_full=len(generic_all), label_tokens_full=sum(len(f["label_ids"]) for f in generic_all))


# ---------------------------------------------------------------------------------------------
# Training methods: one Trainer per table row
# ---------------------------------------------------------------------------------------------


OPTIMIZER_SCOPE = "optimizer."  # record_function blocks of the update (the profile's "optimizer" category)


def train_step(model, loss_fn, batch, params, optimizer, lean: bool = True) -> None:
    """One training step as utils.training.train runs it: loss, backward (with the lean SwiGLU
    MLPs unless ``lean`` is False), clipping, AdamW step, zero_grad (the update's parts each in a
    ``record_function`` block, for --profile)."""
    from torch.profiler import record_function

    with lean_mlps(model, lean):
        loss, _ = loss_fn(model, batch)
        loss.backward()
    with record_function(OPTIMIZER_SCOPE + "clip_grad_norm"):
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    with record_function(OPTIMIZER_SCOPE + "step"):
        optimizer.step()
    with record_function(OPTIMIZER_SCOPE + "zero_grad"):
        optimizer.zero_grad(set_to_none=True)


@dataclass
class Trainer:
    """One method's training step, as utils.training.train takes it: loss, backward, clipping,
    AdamW step."""

    name: str
    model: torch.nn.Module
    params: list
    loss_fn: Callable
    features: list[dict]
    optimizer: torch.optim.Optimizer
    note: str = ""
    prepare: Callable | None = None  # untimed, before the rounds; returns extra figures for the row
    lean: bool = True  # the SwiGLU MLPs save two tensors for the backward (utils.lean_mlp), as train() runs them
    extra: dict = field(default_factory=dict)
    times: list = field(default_factory=list)
    cpu_times: list = field(default_factory=list)  # process CPU seconds (all threads) per timed step
    tokens: list = field(default_factory=list)
    flops: list = field(default_factory=list)
    peak_bytes: list = field(default_factory=list)
    saved_bytes: list = field(default_factory=list)  # activation bytes saved for backward, per counted step
    step_peak_above_start: list = field(default_factory=list)  # CUDA: exact; CPU: RSS growth (blind to reused pages)

    def batch(self, idx, device, pad_id):
        return to_device(collate([self.features[i] for i in idx], pad_id), device)

    def step(self, batch) -> None:
        train_step(self.model, self.loss_fn, batch, self.params, self.optimizer, self.lean)

    def count_flops(self, batch, device=None) -> int:
        """Matmul/attention FLOPs of the loss's forward and backward on ``batch`` (no update);
        also records the activation bytes that step saves for backward and its peak memory
        above the start (``saved_bytes``, ``step_peak_above_start``)."""
        counter = flop_counter()
        saved = SavedActivations(self.loss_fn, unwrap(self.model))
        with PeakMemory(device if device is not None else batch["input_ids"].device) as mem, counter, lean_mlps(self.model, self.lean):
            loss, _ = saved(self.model, batch)
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        self.saved_bytes.append(saved.per_step[-1])
        self.step_peak_above_start.append(mem.delta)
        return counter.get_total_flops()


def adamw(params, lr):
    return torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)


@dataclass
class Bench:
    args: object
    device: torch.device
    model_path: str
    tokenizer: object
    data: Data
    dtype: torch.dtype
    results: dict = field(default_factory=dict)
    spul_model: torch.nn.Module | None = None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def load(self, quantize=False):
        model, quantized = load_model(self.model_path, self.device, quantize=quantize, tokenizer=self.tokenizer)
        return model, quantized


def qlora_trainers(bench: Bench) -> list[Trainer]:
    """qlora.py's step: 4-bit NF4 base (or full precision with --no_quantize, or when
    bitsandbytes cannot), LoRA on the attention projections, label CE."""
    model, quantized = bench.load(quantize=not bench.args.no_quantize)
    model = prepare_for_training(model, quantized, bench.device)
    model = add_lora(model, lora_config(bench.args.lora_rank, target_modules=lora_target_modules(model)))
    params = [p for p in model.parameters() if p.requires_grad]
    note = ("4-bit NF4 + LoRA" if quantized else "LoRA on full precision (no 4-bit)") + f" r={bench.args.lora_rank}"
    return [Trainer("QLoRA", model, params, label_ce, bench.data.plain, adamw(params, LR["qlora"]), note)]


SPUL_VARIANTS = (  # name, SpulObjective options, lean MLP, note
    ("SPUL", {"reference_cache": True}, True, "spul.py's step: prompt KV cache, reference cache (epochs 2+), lean SwiGLU MLP"),
    ("SPUL, reference on the fly", {}, True, "--no_cache_reference: the reference forward at every step (spul.py's first epoch)"),
    ("SPUL, without the lean MLP", {"reference_cache": True}, False, "as SPUL, the MLPs run as the model defines them (3 saved tensors)"),
    ("SPUL, prompt prepended", {"prompt_cache": False}, True, "prompt prepended to every row, reference on the fly"),
)


def spul_trainers(bench: Bench) -> list[Trainer]:
    """spul.py's step on the frozen model (the one of the memory run): the prompt through its
    key/value cache, the reference from its cache in the steady state (every epoch after the
    first: the cache is filled over the bench batches before timing; the first visits' cost is
    reported with the row), the lean SwiGLU MLP; and the variants that each undo one of these."""
    model, args = bench.spul_model, bench.args
    params = trainable_parameters(model)
    rows = []
    for name, options, lean, note in SPUL_VARIANTS:
        objective = SpulObjective(prompt_embeddings, args.alpha, args.beta, **options)
        prepare = (lambda t: fill_reference_cache(bench, t)) if options.get("reference_cache") else None
        rows.append(Trainer(name, model, params, objective, bench.data.generic, adamw(params, LR["spul"]),
                            f"p={args.ptuning_num_tokens}, beta={args.beta:g}, {note}", prepare, lean=lean))
    if args.prefix_tokens:
        fixed = prefix_rows(bench, args.prefix_tokens)
        for name, objective, note in (
            ("SPUL + prefix, cached once", SpulObjective(prompt_embeddings, args.alpha, args.beta, reference_cache=True, fixed_prefix=fixed),
             "the prefix's keys/values built once, each step runs the p soft rows after them (spul.py --hard_prefix)"),
            ("SPUL + prefix, joined per step", SpulObjective(lambda m: join_prefix(fixed, prompt_embeddings(m)), args.alpha, args.beta, reference_cache=True),
             "the q + p rows built with grad at every step (spul.py --hard_prefix before this option existed)")):
            rows.append(Trainer(name, model, params, objective, bench.data.generic, adamw(params, LR["spul"]),
                                f"p={args.ptuning_num_tokens}, q={args.prefix_tokens}, beta={args.beta:g}, {note}",
                                lambda t: fill_reference_cache(bench, t)))
    return rows


def prefix_rows(bench: Bench, q: int) -> torch.Tensor:
    """(q, d) fixed rows for the prefix variants: the embeddings of the first q token ids of the
    bench's training rows (what the tokens say does not change the cost)."""
    ids = [i for f in bench.data.generic for i in f["input_ids"]][:q]
    if len(ids) < q:
        raise SystemExit(f"error: --prefix_tokens {q}: the bench's rows hold only {len(ids)} tokens")
    embed = unwrap(bench.spul_model).get_input_embeddings()
    with torch.no_grad():
        return embed(torch.tensor(ids, device=embed.weight.device)).detach()


def fill_reference_cache(bench: Bench, t: Trainer) -> dict:
    """The first epoch of the reference cache: one visit of every bench batch."""
    t.model.train()
    seconds = sum(timed(lambda: t.loss_fn.reference(t.model, t.batch(idx, bench.device, bench.pad_id)), bench.device)[0]
                  for idx in bench.data.batches)
    cost = t.loss_fn.cost()
    full = len(bench.data.generic) * bench.data.vocab_size * 4
    return {"first_visit_reference_seconds_per_step": seconds / len(bench.data.batches),
            "reference_cache_bytes": cost["bytes_kept_between_steps"],
            "reference_cache_ratio_to_full_cache": cost["bytes_kept_between_steps"] / full}


class ReleaseStyleSpul:
    """The SPUL step computed the way the paper's public release computes it, on current
    libraries: the peer the project's step is measured against (issue 17).

    - the PEFT P-tuning model's own forward, ``peft_model(input_ids, attention_mask,
      labels=None, use_cache=False)``: PEFT runs the prompt encoder for every row and prepends the p virtual
      tokens to every row, and the model returns full-vocabulary logits at all p+L positions;
    - the loss terms are taken from those full logits at the label-predicting positions
      (``label_pos`` shifted by p), through the project's ``spul_loss``: the same L_f, L_r and
      L_kl (per-sample means over label tokens, then over the samples a term applies to) as
      ``SpulObjective``, so both compute the same loss and gradient to float rounding;
    - the no-prompt reference of L_kl is read from logits precomputed once, before training, by a
      separate copy of the model (the release deep-copies the model before adding the prompt and
      keeps that copy for the whole run) and kept in host memory as fp32, one entry per training
      example, moved to the device for every step.

    What the release keeps (``get_logits_from_base_model`` in its utils.py): the copy's forward
    computes full logits over the whole sequence, but only the rows at the label positions are
    kept (``logits[label_mask]``), one V-vector per label token of *every* training example
    (forget examples too), as fp32. This class keeps the same: n_train x (label tokens per
    example) x V x 4 bytes, not n_train x L x V x 4. (The release reads those rows at the label
    tokens' own positions, not at the positions that predict them; here they are read at the
    predicting positions, so that the loss is SPUL's.)

    Differences from the release that only make this peer cheaper (stated so that the ratio is
    not flattering): the losses are computed at the label positions only (the release's
    ``CrossEntropyLoss`` ran log-softmax over all p+L positions), the precompute runs under
    ``inference_mode`` (the release built an autograd graph), and the step runs without
    gradient checkpointing (the release trained with ``gradient_checkpointing=True``, which
    recomputes the forward in the backward). Like every row it runs in the bench's dtype (the
    release: fp16 mixed precision on a GPU). With one label token per example (the template's
    labels) the release's per-token sums equal the per-sample means used here."""

    global_counts = True  # the same normalisation as SpulObjective under utils.training.train

    def __init__(self, alpha: float, beta: float):
        self.alpha, self.beta = alpha, beta
        self.rows: dict[int, torch.Tensor] = {}  # batch["index"] -> (label tokens, V) fp32, host memory
        self.nbytes = 0
        self.precompute_seconds = 0.0

    @staticmethod
    def num_virtual_tokens(peft_model) -> int:
        return peft_model.active_peft_config.num_virtual_tokens

    def precompute(self, reference_model, features: list[dict], batch_size: int, device, pad_id: int) -> None:
        """One pass of the separate model copy over ``features`` (each with its ``index``):
        full logits (B, L, V), the rows at the label-predicting positions kept per example."""
        reference_model.eval()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, len(features), batch_size):
                chunk = features[s: s + batch_size]
                batch = to_device(collate(chunk, pad_id), device)
                logits = reference_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
                at_labels = gather_label_logits(logits, batch["label_pos"]).float()
                for j, f in enumerate(chunk):
                    row = at_labels[j, : len(f["label_ids"])].to("cpu", copy=True)
                    self.rows[int(f["index"])] = row
                    self.nbytes += row.numel() * row.element_size()
        self.precompute_seconds += time.perf_counter() - t0

    def reference(self, batch: dict, K: int, V: int, device) -> torch.Tensor | None:
        """(B, K, V) precomputed no-prompt logits of the batch's rows (zeros where a row has
        fewer label tokens; forget rows are never read by L_kl), moved to ``device``."""
        retain = ~batch["is_forget"].bool()
        if not self.beta or not retain.any():
            return None
        ref = torch.zeros(len(retain), K, V)
        for i, idx in enumerate(batch["index"].tolist()):
            row = self.rows[idx]
            ref[i, : row.size(0)] = row
        return ref.to(device)

    def __call__(self, peft_model, batch):
        p = self.num_virtual_tokens(peft_model)
        # use_cache=False: the release trained with gradient checkpointing, under which transformers
        # builds no key/value cache; without it, current transformers would copy every layer's keys
        # and values into one, a cost the release never paid
        out = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=None, use_cache=False)
        logits = gather_label_logits(out.logits, batch["label_pos"], p).float()  # (B, K, V) of (B, p+L, V)
        ref = self.reference(batch, logits.size(1), logits.size(2), logits.device)
        return spul_loss(logits, ref, batch, self.alpha, self.beta)


def release_style_trainer(bench: Bench) -> list[Trainer]:
    """The release-style SPUL step on the SPUL model (same frozen weights, same prompt encoder,
    its own AdamW), its reference logits precomputed by a deep copy of the frozen model."""
    model, args = bench.spul_model, bench.args
    params = trainable_parameters(model)
    objective = ReleaseStyleSpul(args.alpha, args.beta)
    note = f"p={args.ptuning_num_tokens}, beta={args.beta:g}, PEFT's own forward, full logits, reference logits precomputed by a model copy"
    return [Trainer("SPUL, release-style", model, params, objective, bench.data.generic, adamw(params, LR["spul"]), note,
                    lambda t: fill_release_reference(bench, t), lean=False)]  # the model's own MLP forward, as the release runs it


def fill_release_reference(bench: Bench, t: Trainer) -> dict:
    """Untimed, before the rounds: the model copy, its pass over every bench row, and the bytes
    the release holds for a whole training run (the copy's weights, the cache of every example
    of the training set)."""
    reference_model = copy.deepcopy(unwrap(bench.spul_model))
    copy_bytes = model_bytes(reference_model)
    t.loss_fn.precompute(reference_model, bench.data.generic, bench.args.eval_batch_size, bench.device, bench.pad_id)
    # the release holds the copy for the whole run; it is freed here (its bytes are counted),
    # so that the other methods do not time under its memory pressure
    del reference_model
    full_cache = bench.data.label_tokens_full * bench.data.vocab_size * 4
    return {"reference_copy_bytes": copy_bytes,
            "reference_cache_bytes_bench_rows": t.loss_fn.nbytes,
            "reference_cache_bytes_training_set": full_cache,
            "reference_cache_what": "fp32 full-vocabulary logits at the label positions of every training example "
                                    "(n_train x label tokens x V x 4), as the release keeps them",
            "precompute_seconds_bench_rows": t.loss_fn.precompute_seconds,
            "precompute_seconds_per_example": t.loss_fn.precompute_seconds / len(bench.data.generic)}


def baseline_trainers(bench: Bench) -> list[Trainer]:
    """Every method of utils.baselines.METHODS, full fine-tuning of one shared model copy, each
    with its registry loss and the reference it needs (built here, before any update)."""
    args = bench.args
    model, _ = bench.load()
    model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, LR["baseline"])
    rows, refs = [], {}
    for key, method in METHODS.items():
        if method.training_free:  # no step to time
            continue
        feats = bench.data.features(method.relabel_forget)
        weights = method_weights(method, method.default_weight, vars(args))
        if method.needs_reference(weights):
            reference = build_reference_store(model, method, feats, args.eval_batch_size, bench.device, bench.pad_id, args.kl_topk, weights)
            refs[method.display] = reference.stats
        else:
            reference = NoReference()
        loss_fn = make_loss_fn(method, reference, weights)
        note = "full fine-tuning" + (f", retain weight {weights.retain:g}" if method.retain_term else "")
        rows.append(Trainer(method.display, model, params, loss_fn, feats, optimizer, note))
    bench.results["reference"] = reference_figures(bench, refs)
    return rows


TRAINER_BUILDERS = (qlora_trainers, spul_trainers, release_style_trainer, baseline_trainers)


def reference_figures(bench: Bench, refs: dict) -> dict:
    n, vocab = len(bench.data.plain), bench.data.vocab_size
    full = n * vocab * 4
    rows = {name: {"bytes": s["bytes"], "entries_logprob": s["entries_logprob"], "entries_distribution": s["entries_distribution"],
                   "kl_topk": s["kl_topk"], "build_seconds": s["seconds"], "ratio_to_full_cache": s["bytes"] / full}
            for name, s in refs.items()}
    rows["SPUL, reference on the fly"] = {"bytes": 0, "note": "--no_cache_reference (same frozen model, prompt bypassed): nothing kept between steps",
                                          "ratio_to_full_cache": 0.0}
    return {"n_train": n, "vocab_size": vocab, "full_vocab_fp32_cache_bytes": full, "methods": rows,
            "max_bytes": max(r["bytes"] for r in rows.values())}


def run_rounds(bench: Bench, trainers: list[Trainer], peaks: list) -> None:
    """Warm-up rounds, then timed rounds; each round runs every method once on that round's
    batch (the order rotates per round) and measures the matmul peak once."""
    args = bench.args
    for r, idx in enumerate(bench.data.batches):
        timed_round = r >= args.warmup_steps
        order = trainers[r % len(trainers):] + trainers[: r % len(trainers)]
        for t in order:
            t.model.train()
            batch = t.batch(idx, bench.device, bench.pad_id)
            cpu0 = time.process_time()
            with PeakMemory(bench.device) as mem:
                seconds, _ = timed(lambda: t.step(batch), bench.device)
            if timed_round:
                t.times.append(seconds)
                t.cpu_times.append(time.process_time() - cpu0)
                t.tokens.append(int(batch["num_tokens"].sum()))
                t.peak_bytes.append(mem.peak)
            print(f"  round {r + 1}/{len(bench.data.batches)} {'timed' if timed_round else 'warm-up'}: {t.name} {seconds:.3f} s", file=sys.stderr)
        if timed_round:
            peaks.append(matmul_peak(args.matmul_size, bench.dtype, bench.device))


def count_flops(bench: Bench, trainers: list[Trainer], names=("SPUL", "SPUL, without the lean MLP", "SPUL, release-style", "GA+GD")) -> None:
    """FLOPs of the timed batches of the named methods (in a separate, untimed pass), with the
    activation bytes each of those steps saves for backward and its batch shape."""
    timed_batches = bench.data.batches[bench.args.warmup_steps:][: bench.args.flop_steps]
    for t in trainers:
        if t.name in names:
            t.model.train()
            t.flops = []
            for idx in timed_batches:
                batch = t.batch(idx, bench.device, bench.pad_id)
                t.flops.append(t.count_flops(batch, bench.device))
                t.extra.setdefault("counted_batch_shapes", []).append(
                    {"B": batch["input_ids"].size(0), "L": batch["input_ids"].size(1), "K": batch["label_ids"].size(1)})


def trainer_row(t: Trainer, peak_flops: float, cuda: bool) -> dict:
    row = {
        "note": t.note,
        "trainable_params": sum(p.numel() for p in t.params),
        "step_seconds_median": statistics.median(t.times),
        "step_seconds": t.times,
        "step_cpu_seconds_median": statistics.median(t.cpu_times),
        "tokens_per_step": t.tokens,
        "tokens_per_second": sum(t.tokens) / sum(t.times),
        **t.extra,
    }
    if t.flops:
        k = len(t.flops)
        achieved = sum(t.flops) / sum(t.times[:k])
        row.update(flops_per_step=t.flops, achieved_flops_per_second=achieved, share_of_matmul_peak=achieved / peak_flops,
                   saved_activation_bytes_counted_steps=t.saved_bytes)
    if cuda:
        row["peak_allocated_bytes"] = max(t.peak_bytes)
    return row


def release_comparison(bench: Bench, trainers: dict[str, Trainer]) -> dict:
    """SPUL against the release-style step: step time, FLOPs, and peak memory accounted the
    same way for both, on the FLOP-counted batches: what the method holds for the whole run
    (the model's weights; the release also its model copy and its reference cache of the whole
    training set) plus the step's transient (CUDA: the measured peak allocated above the start
    of the step; CPU, where the RSS cannot see freed pages the allocator reuses: the activation
    bytes saved for backward plus the logits tensors of the step, a lower bound). On CUDA the
    release keeps its cache in host memory: it is listed, not added to the device peak."""
    rel, spul = trainers["SPUL, release-style"], trainers["SPUL"]
    weights = bench.results["memory"]["model_weights_bytes"]
    cuda = bench.device.type == "cuda"
    V, p = bench.data.vocab_size, bench.args.ptuning_num_tokens
    elsize = torch.finfo(bench.dtype).bits // 8

    def transient(t: Trainer, logits_bytes) -> int:
        if cuda:
            return max(t.step_peak_above_start)
        return max(sb + logits_bytes(sh) for sb, sh in zip(t.saved_bytes, t.extra["counted_batch_shapes"]))

    # release: full logits (B, p+L, V) in the model's dtype; SPUL: label-position logits and reference, fp32
    rel_transient = transient(rel, lambda sh: sh["B"] * (p + sh["L"]) * V * elsize + sh["B"] * sh["K"] * V * 4 * 2)
    spul_transient = transient(spul, lambda sh: sh["B"] * sh["K"] * V * 4 * 2)
    cache = rel.extra["reference_cache_bytes_training_set"]
    rel_peak = weights + rel.extra["reference_copy_bytes"] + (0 if cuda else cache) + rel_transient
    spul_peak = weights + spul_transient
    t_spul, t_rel = statistics.median(spul.times), statistics.median(rel.times)
    return {
        "what": ("device peak: weights held + measured peak allocated above the start of one step" if cuda else
                 "weights and caches held + activation bytes saved for backward + the step's logits tensors (a lower bound)"),
        "step_seconds_ratio_spul_to_release": t_spul / t_rel,
        "step_seconds_ratio_to_release": {name: statistics.median(t.times) / t_rel for name, t in trainers.items()
                                          if name.startswith("SPUL") and t is not rel},
        "flops_per_step_ratio_spul_to_release": statistics.mean(spul.flops) / statistics.mean(rel.flops) if spul.flops and rel.flops else None,
        "release_peak_bytes": rel_peak,
        "release_peak_ratio_to_one_model_copy": rel_peak / weights,
        "release_host_cache_bytes": cache,
        "release_cache_counted_in_peak": not cuda,
        "release_step_transient_bytes": rel_transient,
        "spul_peak_bytes_same_accounting": spul_peak,
        "spul_peak_ratio_to_one_model_copy_same_accounting": spul_peak / weights,
        "spul_step_transient_bytes": spul_transient,
        "spul_peak_ratio_to_release_peak": spul_peak / rel_peak,
        "model_weights_bytes": weights,
    }


# ---------------------------------------------------------------------------------------------
# Memory of a SPUL training run
# ---------------------------------------------------------------------------------------------


def spul_memory_run(bench: Bench, rss_before_model: int) -> None:
    """Load the frozen model, add the prompt, train SPUL for --memory_steps steps with the real
    training loop; peak memory against one copy of the model's weights."""
    args = bench.args
    model, _ = bench.load()
    rss_model = rss_bytes()
    model = add_prompt(model, args.ptuning_num_tokens, args.ptuning_hidden_size, args.seed)
    weights = model_bytes(unwrap(model))
    feats = bench.data.generic[: args.memory_steps * args.batch_size]
    cfg = TrainConfig(lr=LR["spul"], num_epochs=1, batch_size=args.batch_size, weight_decay=WEIGHT_DECAY, warmup_ratio=0.1,
                      max_grad_norm=MAX_GRAD_NORM, seed=args.seed)
    objective = SpulObjective(prompt_embeddings, args.alpha, args.beta, reference_cache=True)  # as spul.py (its first epoch)
    saved = SavedActivations(objective, model)
    with PeakMemory(bench.device) as mem:
        stats = train(model, trainable_parameters(model), saved, feats, cfg, bench.device, bench.pad_id, desc="spul memory run")
    tokens = sum(len(f["input_ids"]) for f in feats)  # every step of the run, real (non-pad) text tokens
    cuda = bench.device.type == "cuda"
    # CPU: growth of the resident set; pages freed earlier and reused by the allocator are not
    # seen, so a tiny model in a long-lived process can read 0 (never below: clamped).
    used = mem.peak if cuda else max(0, mem.peak - rss_before_model)
    bench.spul_model = model
    bench.results["memory"] = {
        "what": "peak allocated CUDA memory" if cuda else "peak RSS of the process minus its RSS before the model was loaded",
        "model_weights_bytes": weights,
        "spul_peak_bytes": used,
        "ratio": used / weights,
        "steps": stats.steps,
        "process_rss_before_model_bytes": None if cuda else rss_before_model,
        "process_rss_after_model_load_bytes": None if cuda else rss_model,
        "process_peak_rss_bytes": None if cuda else mem.peak,
        "peak_is_process_lifetime": mem.lifetime,
        "saved_activation_bytes_max_step": max(saved.per_step),
        "saved_activation_bytes_per_text_token": sum(saved.per_step) / tokens,
        "train_stats_tokens_per_second": stats.tokens_per_second,
        "kl_reference": objective.cost(),
    }


# ---------------------------------------------------------------------------------------------
# Evaluation and inference
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalPath:
    """One way to get the first label position's logits for a batch. ``prepare`` runs once
    per pass over the evaluation set (inside the timed pass)."""

    forward: Callable
    prepare: Callable = lambda model, prompt: None
    help: str = ""


EVAL_PATHS = {
    "label_position": EvalPath(lambda m, b, s: label_logits(m, b), help="backbone + LM head at the label-predicting positions only"),
    "naive_full_logits": EvalPath(lambda m, b, s: full_logits_at_labels(m, b), help="the model's own forward: full-vocabulary logits at every position, then gathered"),
    "prompt_kv_cache": EvalPath(lambda m, b, s: label_logits(m, b, prompt_cache=s), lambda m, p: PromptCache.build(m, p),
                                help="with the soft prompt: its key/value cache built once per pass, only the text tokens run"),
    "prompt_prepended": EvalPath(lambda m, b, s: label_logits(m, b, s), lambda m, p: p,
                                 help="with the soft prompt prepended to every row"),
}


def eval_pass(model, path: EvalPath, data: Data, batches, device, pad_id, prompt, grad_mode=torch.inference_mode) -> float:
    """Seconds for one pass over the evaluation batches: collate, forward, argmax (as predict)."""

    def run():
        with grad_mode():
            state = path.prepare(model, prompt)
            for idx in batches:
                batch = to_device(collate([data.eval_feats[i] for i in idx], pad_id), device)
                path.forward(model, batch, state)[:, 0].argmax(-1).cpu()

    return timed(run, device)[0]


def measure_eval(bench: Bench, paths=tuple(EVAL_PATHS), batches=None, grad_mode=torch.inference_mode, model=None) -> dict:
    """Examples/s of each path: one warm-up batch each, then --eval_rounds interleaved passes."""
    args, data = bench.args, bench.data
    model = bench.spul_model if model is None else model
    model.eval()
    batches = batches or data.eval_batches
    with torch.no_grad():
        prompt = prompt_embeddings(bench.spul_model).detach()
    n = sum(len(b) for b in batches)
    for name in paths:
        eval_pass(model, EVAL_PATHS[name], data, batches[:1], bench.device, bench.pad_id, prompt, grad_mode)
    times = {name: [] for name in paths}
    for _ in range(args.eval_rounds):
        for name in paths:
            times[name].append(eval_pass(model, EVAL_PATHS[name], data, batches, bench.device, bench.pad_id, prompt, grad_mode))
    return {name: {"examples": n, "seconds": ts, "examples_per_second": n / statistics.median(ts), "help": EVAL_PATHS[name].help}
            for name, ts in times.items()}


def eval_flops(bench: Bench, eval_results: dict) -> None:
    """Matmul/attention FLOPs of one pass of the label-position evaluation forward over the
    evaluation batches (the timed ones; counted in a separate, untimed pass), and its achieved
    FLOP/s: those FLOPs over the median timed pass (collate and argmax included)."""
    model, data = bench.spul_model, bench.data
    model.eval()
    counter = flop_counter()
    with torch.inference_mode(), counter:
        for idx in data.eval_batches:
            label_logits(model, to_device(collate([data.eval_feats[i] for i in idx], bench.pad_id), bench.device))
    row = eval_results["label_position"]
    row["flops_per_pass"] = counter.get_total_flops()
    row["achieved_flops_per_second"] = row["flops_per_pass"] / statistics.median(row["seconds"])


# ---------------------------------------------------------------------------------------------
# Other levers (--levers)
# ---------------------------------------------------------------------------------------------


def padding_share(features, batches) -> float:
    real = sum(len(features[i]["input_ids"]) for b in batches for i in b)
    padded = sum(len(b) * max(len(features[i]["input_ids"]) for i in b) for b in batches)
    return 1 - real / padded


def spul_step_lever(bench: Bench, trainer: Trainer, setup: Callable, teardown: Callable) -> dict:
    """Median time, peak memory above the start (CUDA: exact; CPU: RSS, blind to memory the
    allocator already holds) and the activation bytes saved for backward (exact) of SPUL steps
    on the timed batches under ``setup``."""
    idxs = bench.data.batches[bench.args.warmup_steps:]
    times, peaks = [], []
    loss_fn = trainer.loss_fn
    trainer.loss_fn = saved = SavedActivations(loss_fn, unwrap(trainer.model))
    setup()
    try:
        trainer.model.train()
        for idx in idxs:
            batch = trainer.batch(idx, bench.device, bench.pad_id)
            with PeakMemory(bench.device) as mem:
                times.append(timed(lambda: trainer.step(batch), bench.device)[0])
            peaks.append(mem.delta)
    finally:
        teardown()
        trainer.loss_fn = loss_fn
    return {"step_seconds_median": statistics.median(times), "step_peak_bytes_above_start": max(peaks),
            "saved_activation_bytes_max_step": max(saved.per_step)}


def compile_lever(bench: Bench, trainer: Trainer) -> dict:
    """torch.compile, regional: every decoder layer compiled (``Module.compile``, dynamic
    shapes; identical layers share the compiled code). The compile time is counted with the
    first compiled forward (no grad, for the loss) and step; then eager and compiled steps alternate on each timed batch, so that a drift
    of the machine's speed hits both. The loss of the first batch under both, for the size of
    the rounding change."""
    layers = list(backbone(trainer.model).layers)
    batches = [trainer.batch(idx, bench.device, bench.pad_id) for idx in bench.data.batches[bench.args.warmup_steps:]]
    trainer.model.train()

    def use(compiled):  # Module.compile keeps the compiled call in _compiled_call_impl; None: eager
        for layer, impl in zip(layers, compiled):
            layer._compiled_call_impl = impl

    def loss_of(batch):
        with torch.no_grad(), lean_mlps(trainer.model, trainer.lean):
            return float(trainer.loss_fn(trainer.model, batch)[0])

    eager_loss = loss_of(batches[0])
    try:
        t0 = time.perf_counter()
        for layer in layers:
            layer.compile(dynamic=True)
        compiled_loss = loss_of(batches[0])  # the same prompt as eager_loss: no step has run yet
        first, _ = timed(lambda: trainer.step(batches[0]), bench.device)
        compiled, compile_seconds = [layer._compiled_call_impl for layer in layers], time.perf_counter() - t0
        eager_times, compiled_times = [], []
        for batch in batches:
            use([None] * len(layers))
            eager_times.append(timed(lambda: trainer.step(batch), bench.device)[0])
            use(compiled)
            compiled_times.append(timed(lambda: trainer.step(batch), bench.device)[0])
    except Exception as e:  # noqa: BLE001 - a backend that cannot compile here is a result too
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    finally:
        use([None] * len(layers))
    eager, comp = statistics.median(eager_times), statistics.median(compiled_times)
    return {"first_compiled_step_seconds": first, "compile_and_first_step_seconds": compile_seconds,
            "eager_step_seconds_median": eager, "compiled_step_seconds_median": comp, "compiled_to_eager": comp / eager,
            "pairs": len(batches), "loss_eager": eager_loss, "loss_compiled": compiled_loss,
            "loss_relative_difference": abs(compiled_loss - eager_loss) / max(abs(eager_loss), 1e-30)}


def measure_levers(bench: Bench, trainers: dict[str, Trainer], split_feats: list[dict]) -> dict:
    args, device, out = bench.args, bench.device, {}
    cpu = device.type == "cpu"
    data = bench.data

    # length-grouped batches and dynamic padding (collate pads to the longest row of a batch)
    random_eval = [list(range(s, min(s + args.eval_batch_size, len(data.eval_feats)))) for s in range(0, len(data.eval_feats), args.eval_batch_size)]
    ev_grouped = measure_eval(bench, ("label_position",))["label_position"]
    ev_random = measure_eval(bench, ("label_position",), batches=random_eval)["label_position"]
    train_random = epoch_batches(len(split_feats), args.batch_size, args.seed, 0)
    out["length_grouping"] = {
        "eval_padding_share_grouped": padding_share(data.eval_feats, data.eval_batches),
        "eval_padding_share_unsorted": padding_share(data.eval_feats, random_eval),
        "eval_examples_per_second_grouped": ev_grouped["examples_per_second"],
        "eval_examples_per_second_unsorted": ev_random["examples_per_second"],
        "train_padding_share_shuffled_batches": padding_share(split_feats, train_random),
        "train_padding_share_length_grouped_megabatches": padding_share(split_feats, epoch_batches(len(split_feats), args.batch_size, args.seed, 0, [len(f["input_ids"]) for f in split_feats], group=50)),
    }
    # torch.inference_mode against torch.no_grad for evaluation
    nograd = measure_eval(bench, ("label_position",), grad_mode=torch.no_grad)["label_position"]
    out["inference_mode"] = {"inference_mode_examples_per_second": ev_grouped["examples_per_second"],
                             "no_grad_examples_per_second": nograd["examples_per_second"]}
    # GQA inside SDPA instead of repeating the key/value heads (transformers' switch)
    os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"
    try:
        gqa = measure_eval(bench, ("label_position",))["label_position"]
        gqa_step = spul_step_lever(bench, trainers["SPUL"], lambda: None, lambda: None)
    except Exception as e:  # noqa: BLE001 - a kernel that refuses GQA with a mask is a result too
        gqa, gqa_step = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}, None
    finally:
        os.environ.pop("TRANSFORMERS_SDPA_FORCE_GQA", None)
    base_step = spul_step_lever(bench, trainers["SPUL"], lambda: None, lambda: None)
    out["gqa_in_sdpa"] = {"eval_examples_per_second": gqa.get("examples_per_second"), "eval_examples_per_second_repeat_kv": ev_grouped["examples_per_second"],
                          "spul_step": gqa_step, "spul_step_repeat_kv": base_step, **({"error": gqa["error"]} if "error" in gqa else {})}
    # gradient checkpointing on the SPUL step (the prompt is then prepended: checkpointing drops caches)
    base = unwrap(bench.spul_model)
    out["gradient_checkpointing"] = {
        "with": spul_step_lever(bench, trainers["SPUL"], lambda: base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}),
                                base.gradient_checkpointing_disable),
        "without_prompt_prepended": spul_step_lever(bench, trainers["SPUL, prompt prepended"], lambda: None, lambda: None),
        "without_prompt_cache": base_step,
    }
    if cpu:
        # threads: the matmul peak and the label-position forward at 1 thread and at every core
        threads = torch.get_num_threads()
        res = {}
        model, idx = bench.spul_model.eval(), data.eval_batches[0]
        batch = to_device(collate([data.eval_feats[i] for i in idx], bench.pad_id), device)
        try:
            for n in sorted({1, os.cpu_count() or 1}):
                torch.set_num_threads(n)
                with torch.inference_mode():
                    label_logits(model, batch)
                    best = min(timed(lambda: label_logits(model, batch), device)[0] for _ in range(2))
                res[str(n)] = {"matmul_flops_per_second": matmul_peak(args.matmul_size, bench.dtype, device),
                               "eval_examples_per_second_one_batch": len(idx) / best}
        finally:
            torch.set_num_threads(threads)
        out["threads"] = {"used": threads, "by_threads": res, "load_average": os.getloadavg()}
        # bf16 on CPU
        bf16 = copy.deepcopy(unwrap(bench.spul_model)).to(torch.bfloat16).eval()
        out["bf16_on_cpu"] = {
            "bf16_eval_examples_per_second": measure_eval(bench, ("label_position",), model=bf16)["label_position"]["examples_per_second"],
            "fp32_eval_examples_per_second": ev_grouped["examples_per_second"],
            "bf16_matmul_flops_per_second": matmul_peak(args.matmul_size, torch.bfloat16, device),
        }
        del bf16
    return out


# ---------------------------------------------------------------------------------------------
# Profile (--profile)
# ---------------------------------------------------------------------------------------------
#
# torch.profiler (CPU activities, record_shapes) over one SPUL step, one GA+GD step and one
# evaluation forward. Every recorded event's *self* CPU time (its time minus its children's)
# goes to exactly one category, so nothing is counted twice; the categories and the overhead
# add up to the wall time of the profiled region. An aten op that is not inside another aten op
# (a "root" op) fixes the category of itself and of everything it calls:
#
# - lm_head: a matmul op (below) with the vocabulary size V among the dimensions of its inputs
#   (the final projection, forward and backward);
# - matmul: aten::mm, addmm, bmm, baddbmm, matmul, linear, addmv, mv, dot;
# - attention: ops whose name contains scaled_dot_product, flash_attention,
#   efficient_attention or cudnn_attention (the SDPA kernels; rotary embeddings and the
#   repetition of key/value heads around them are element-wise or other ops);
# - norm: every op run inside an RMSNorm / LayerNorm module (its forward is wrapped in a
#   record_function by module hooks: pow, mean, add, rsqrt, mul, to of LlamaRMSNorm), and ops
#   whose name contains rms_norm or layer_norm (fused kernels);
# - elementwise: the point-wise ops of ELEMENTWISE_OPS (mul, add, sub, div, silu, neg, exp, pow,
#   rsqrt, where, ... and their in-place and backward forms);
# - optimizer: everything inside the ``optimizer.*`` blocks of ``train_step`` (gradient
#   clipping, the AdamW step, zero_grad), their Python time included;
# - other_ops: every other aten op (copies and dtype casts, cat, views, gather, embedding,
#   softmax / log-softmax, reductions, gradient accumulation into .grad);
# - overhead: Python and framework time: the wall time minus the self time of every event
#   above (time outside any op: the model's Python, PEFT, transformers' mask building), plus
#   the self time of the autograd engine's wrappers and of non-optimizer scopes.
#
# Backward: an autograd node ("autograd::engine::evaluate_function: XBackward0") takes the
# category of the forward op that created it (linked by sequence number), so the backward of
# the LM head, the norms or the attention lands in their category; a node without a profiled
# forward op falls back on its name (Mm/Addmm/Bmm: matmul, ScaledDotProduct: attention,
# RmsNorm/LayerNorm: norm, else other_ops). CPU only: on CUDA the CPU times would be launch times.

MATMUL_OPS = frozenset(f"aten::{n}" for n in ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addmv", "mv", "dot"))
ATTENTION_PATTERNS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")
NORM_PATTERNS = ("rms_norm", "layer_norm")
ELEMENTWISE_OPS = frozenset(
    f"aten::{n}{suffix}" for n in (
        "mul", "add", "sub", "rsub", "div", "neg", "silu", "sigmoid", "tanh", "relu", "gelu", "exp", "log", "pow", "rsqrt",
        "sqrt", "reciprocal", "where", "masked_fill", "clamp", "clamp_min", "clamp_max", "cos", "sin", "abs", "sign",
        "maximum", "minimum", "addcmul", "addcdiv", "lerp", "threshold", "square", "eq", "ne", "gt", "lt", "ge", "le",
        "logical_not", "bitwise_not", "silu_backward", "sigmoid_backward", "tanh_backward", "gelu_backward",
        "threshold_backward", "pow_backward")
    for suffix in ("", "_"))
CATEGORIES = ("matmul", "lm_head", "attention", "norm", "elementwise", "optimizer", "other_ops", "overhead")
NORM_SCOPE = "bench.norm_module"
ENGINE_PREFIX = "autograd::engine::evaluate_function: "


def _shape_dims(shapes) -> set:
    dims = set()
    for shape in shapes or ():
        if isinstance(shape, (list, tuple)):
            dims.update(d for d in shape if isinstance(d, int))
    return dims


def _op_category(event, vocab_size: int) -> str:
    name = event.name
    if name in MATMUL_OPS:
        return "lm_head" if vocab_size in _shape_dims(event.input_shapes) else "matmul"
    if any(p in name for p in ATTENTION_PATTERNS):
        return "attention"
    if any(p in name for p in NORM_PATTERNS):
        return "norm"
    return "elementwise" if name in ELEMENTWISE_OPS else "other_ops"


def _node_category(event, vocab_size: int) -> str:
    """The category of a backward node from its name (when no forward op links to it)."""
    node = event.name[len(ENGINE_PREFIX):]
    if any(k in node for k in ("MmBackward", "AddmmBackward", "BmmBackward", "MvBackward", "DotBackward")):
        shapes = [s for c in event.cpu_children for s in (c.input_shapes or ())]
        return "lm_head" if vocab_size in _shape_dims(shapes) else "matmul"
    if "ScaledDotProduct" in node or "Attention" in node:
        return "attention"
    if "RmsNorm" in node or "LayerNorm" in node:
        return "norm"
    return "other_ops"


def categorise(events, vocab_size: int) -> tuple[dict, list]:
    """Self CPU microseconds per category (overhead excluded: it is the wall time's remainder,
    plus the engine wrappers' and plain scopes' self time, returned under "overhead") and the
    self time per op name with its category, over the profiler's ``events``."""
    buckets = dict.fromkeys(CATEGORIES, 0.0)
    per_op: dict[tuple[str, str], list] = {}
    forward_cat: dict[tuple[int, int], str] = {}

    def add(event, cat):
        buckets[cat] += event.self_cpu_time_total
        entry = per_op.setdefault((event.name, cat), [0.0, 0])
        entry[0] += event.self_cpu_time_total
        entry[1] += 1

    def visit(event, cat):
        name = event.name
        if cat is None:
            if name.startswith(OPTIMIZER_SCOPE):
                cat = "optimizer"
            elif name == NORM_SCOPE:
                add(event, "overhead")  # the module's Python; its ops are norm
                for child in event.cpu_children:
                    visit(child, "norm")
                return
            elif name.startswith(ENGINE_PREFIX):
                add(event, "overhead")  # the autograd engine's own time
                node_cat = forward_cat.get((event.fwd_thread, event.sequence_nr)) if event.sequence_nr >= 0 else None
                node_cat = node_cat or _node_category(event, vocab_size)
                for child in event.cpu_children:
                    visit(child, node_cat)
                return
            elif name.startswith("aten::"):
                cat = _op_category(event, vocab_size)
        if name.startswith("aten::") and event.sequence_nr >= 0 and cat is not None:
            forward_cat.setdefault((event.thread, event.sequence_nr), cat)
        add(event, cat or "overhead")
        for child in event.cpu_children:
            visit(child, cat)

    roots = sorted((e for e in events if e.cpu_parent is None), key=lambda e: e.time_range.start)
    for root in roots:
        visit(root, None)
    top = sorted(({"op": name, "category": cat, "self_ms": us / 1e3, "calls": n} for (name, cat), (us, n) in per_op.items()),
                 key=lambda r: -r["self_ms"])
    return buckets, top


class NormScopes:
    """Wraps the forward of every RMSNorm / LayerNorm module in a ``record_function`` block
    (NORM_SCOPE), so that the profile can put their ops in the norm category."""

    def __init__(self, model):
        self.model, self.handles = model, []

    def __enter__(self):
        from torch.profiler import record_function

        for module in self.model.modules():
            if type(module).__name__.endswith(("RMSNorm", "LayerNorm")):
                scopes = []

                def enter(mod, inputs, scopes=scopes):
                    scopes.append(record_function(NORM_SCOPE))
                    scopes[-1].__enter__()

                def leave(mod, inputs, output, scopes=scopes):
                    scopes.pop().__exit__(None, None, None)

                self.handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


def profile_workload(fn: Callable, model, device, vocab_size: int, shape: dict, warmup: int = 1, top: int = 15) -> dict:
    """Warm-up runs, one unprofiled timed run, then one run under torch.profiler (CPU, shapes),
    broken into CATEGORIES (ms and % of the profiled run's wall time)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    unprofiled = timed(fn, device)[0]
    with NormScopes(unwrap(model)):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            wall = timed(fn, device)[0]
    events = prof.events()
    buckets, ops = categorise(events, vocab_size)
    wall_us = wall * 1e6
    recorded = sum(buckets.values())
    roots_us = sum(e.time_range.elapsed_us() for e in events if e.cpu_parent is None)
    buckets["overhead"] += wall_us - recorded  # time outside every recorded event
    cats = {c: {"ms": us / 1e3, "percent": 100 * us / wall_us} for c, us in buckets.items()}
    return {
        **shape,
        "wall_ms": wall * 1e3,
        "unprofiled_ms": unprofiled * 1e3,
        "categories": cats,
        "categories_sum_ms": sum(c["ms"] for c in cats.values()),
        "events_self_ms": recorded / 1e3,
        "root_events_ms": roots_us / 1e3,  # equals events_self_ms when no time is counted twice
        "events": len(events),
        "top_ops": ops[:top],
    }


def run_profile(args, device, model_path, tokenizer, encoder, splits) -> dict:
    """--profile: one SPUL step (batch --batch_size, spul.py's step: prompt KV cache, the
    reference from its cache, filled by the warm-up step), one GA+GD step (batch --profile_baseline_batch_size) and one
    label-position evaluation forward (batch --eval_batch_size), on the training / test data
    at --max_length."""
    pad_id = tokenizer.pad_token_id
    plain_all = training_set(encoder, splits, args.seed)
    generic_all = training_set(encoder, splits, args.seed, relabel_forget=True)
    is_forget = [f["is_forget"] for f in plain_all]
    test = encode_frame(encoder, splits["test_retain"], is_forget=False)
    pick = np.random.default_rng([args.seed, 11]).choice(len(test), min(len(test), args.eval_batch_size), replace=False)

    def batch_of(features):
        return to_device(collate(features, pad_id), device)

    def shape(batch):
        return {"batch_size": batch["input_ids"].size(0), "seq_len": batch["input_ids"].size(1),
                "text_tokens": int(batch["num_tokens"].sum())}

    out = {}
    model, _ = load_model(model_path, device, quantize=False, tokenizer=tokenizer)
    vocab = model.get_output_embeddings().weight.size(0)
    spul_model = add_prompt(model, args.ptuning_num_tokens, args.ptuning_hidden_size, args.seed)
    params = trainable_parameters(spul_model)
    optimizer = adamw(params, LR["spul"])
    objective = SpulObjective(prompt_embeddings, args.alpha, args.beta, reference_cache=True)  # the warm-up step fills it
    batch = batch_of([generic_all[i] for i in draw_batches(is_forget, args.batch_size, 1, args.seed)[0]])
    spul_model.train()
    print("profile: SPUL step", file=sys.stderr)
    out["SPUL step"] = profile_workload(lambda: train_step(spul_model, objective, batch, params, optimizer), spul_model, device, vocab,
                                        {**shape(batch), "what": "spul.py's SPUL step (prompt KV cache, reference cache after the first visit, lean SwiGLU MLP) + AdamW"})
    spul_model.eval()
    batch = batch_of([test[i] for i in sorted(pick)])

    def evaluate():
        with torch.inference_mode():
            label_logits(spul_model, batch)

    print("profile: evaluation forward", file=sys.stderr)
    out["evaluation forward"] = profile_workload(evaluate, spul_model, device, vocab,
                                                 {**shape(batch), "what": "label-position forward (no prompt), inference_mode"})
    del spul_model, model, optimizer, objective

    key = "gradient_ascent_descent"
    method = METHODS[key]
    model, _ = load_model(model_path, device, quantize=False, tokenizer=tokenizer)
    model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    feats = generic_all if method.relabel_forget else plain_all
    weights = method_weights(method, method.default_weight, vars(args))
    reference = (build_reference_store(model, method, feats, args.eval_batch_size, device, pad_id, args.kl_topk, weights)
                 if method.needs_reference(weights) else NoReference())
    loss_fn = make_loss_fn(method, reference, weights)
    optimizer = adamw(params, LR["baseline"])
    batch = batch_of([feats[i] for i in draw_batches(is_forget, args.profile_baseline_batch_size, 1, args.seed)[0]])
    model.train()
    print("profile: GA+GD step", file=sys.stderr)
    out["GA+GD step"] = profile_workload(lambda: train_step(model, loss_fn, batch, params, optimizer), model, device, vocab,
                                         {**shape(batch), "what": "full fine-tuning, GA on forget + CE on retain, + AdamW"})
    return out


def format_profile(workloads: dict, setup: dict) -> str:
    names = list(workloads)
    lines = [f"## Profile: {setup['model_name']} on {setup['dataset']}, {setup['device']}, {setup['threads']} thread(s), max length {setup['max_length']}", "",
             "| category | " + " | ".join(f"{n} (B={w['batch_size']}, L={w['seq_len']})" for n, w in workloads.items()) + " |",
             "|---|" + "---|" * len(names)]
    for c in CATEGORIES:
        lines.append(f"| {c} | " + " | ".join(f"{workloads[n]['categories'][c]['ms']:.1f} ms ({workloads[n]['categories'][c]['percent']:.1f}%)" for n in names) + " |")
    lines.append("| **total (profiled wall)** | " + " | ".join(f"{workloads[n]['wall_ms']:.1f} ms" for n in names) + " |")
    lines.append("| unprofiled wall | " + " | ".join(f"{workloads[n]['unprofiled_ms']:.1f} ms" for n in names) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Targets and report
# ---------------------------------------------------------------------------------------------


TARGETS_FILE = Path(__file__).resolve().parent / "scripts" / "bench_targets.json"  # the figures checked, as data
SHOW = {
    "seconds": lambda v: f"{v:.3f} s",
    "flops": lambda v: f"{v / 1e9:.1f} GFLOP/s",
    "bytes": lambda n: f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B",
    "rate": lambda v: f"{v:.1f} ex/s",
}
COMPARE = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b}


def read_targets(path: Path = TARGETS_FILE) -> list[dict]:
    """The targets file: each target a ratio of two values of the results (paths of keys)."""
    try:
        targets = json.loads(Path(path).read_text())["targets"]
    except (OSError, ValueError, KeyError) as e:
        raise cli.UsageError(f"--targets {path}: cannot be read as a targets file ({type(e).__name__})") from e
    for t in targets:
        if t.get("op") not in COMPARE or t.get("show") not in SHOW or t.get("unit") not in ("x", "%"):
            raise cli.UsageError(f"--targets {path}: target {t.get('figure')!r} needs op <=|>=, unit x|%, show {'|'.join(SHOW)}")
    return targets


def _value(results: dict, keys: list):
    for key in keys:
        results = results[key]
    return results


def evaluate_targets(results: dict, targets: list[dict]) -> list[dict]:
    out = []
    for t in targets:
        num, den = _value(results, t["numerator"]), _value(results, t["denominator"])
        ratio = num / den
        fmt = (lambda x: f"{100 * x:.2f}%") if t["unit"] == "%" else (lambda x: f"{x:.2f}x")
        show = SHOW[t["show"]]
        out.append({"figure": t["figure"], "achieved": ratio, "achieved_text": fmt(ratio), "numerator": show(num), "denominator": show(den),
                    "target": f"{t['op']} {fmt(t['threshold'])}", "met": bool(COMPARE[t["op"]](ratio, t["threshold"])),
                    "informational": bool(t.get("informational", False))})
    return out


def format_report(results: dict) -> str:
    meta = results["setup"]
    lines = [f"## Benchmark: {meta['model_name']} on {meta['dataset']}, {meta['device']}, {meta['dtype']}, "
             f"{meta['threads']} thread(s), batch {meta['batch_size']}", ""]
    lines += ["| method | trainable params | step s (median) | train tokens/s | GFLOP/step | achieved GFLOP/s | note |", "|---|---|---|---|---|---|---|"]
    for name, row in results["training"].items():
        gf = f"{statistics.mean(row['flops_per_step']) / 1e9:.1f}" if "flops_per_step" in row else "-"
        ach = f"{row['achieved_flops_per_second'] / 1e9:.1f}" if "achieved_flops_per_second" in row else "-"
        lines.append(f"| {name} | {row['trainable_params']:,} | {row['step_seconds_median']:.3f} | {row['tokens_per_second']:.1f} | {gf} | {ach} | {row['note']} |")
    lines += ["", "| evaluation path | examples/s |", "|---|---|"]
    lines += [f"| {name} | {row['examples_per_second']:.1f} |" for name, row in results["eval"].items()]
    ref = results["reference"]
    lines += ["", f"| reference kept (n_train={ref['n_train']}, V={ref['vocab_size']}) | bytes | share of full-vocab fp32 cache ({SHOW['bytes'](ref['full_vocab_fp32_cache_bytes'])}) |", "|---|---|---|"]
    lines += [f"| {name} | {SHOW['bytes'](row['bytes'])} | {100 * row['ratio_to_full_cache']:.3f}% |" for name, row in ref["methods"].items()]
    lines += [f"| {name} (cache of final hidden states) | {SHOW['bytes'](row['reference_cache_bytes'])} | {100 * row['reference_cache_ratio_to_full_cache']:.3f}% |"
              for name, row in results["training"].items() if "reference_cache_bytes" in row]
    mem = results["memory"]
    lines += ["", f"SPUL memory run ({mem['steps']} steps): {mem['what']}: {SHOW['bytes'](mem['spul_peak_bytes'])}; one model copy {SHOW['bytes'](mem['model_weights_bytes'])}"]
    lines += [f"matmul peak ({meta['dtype']}, n={meta['matmul_size']}): {results['matmul_peak_flops_per_second'] / 1e9:.1f} GFLOP/s", ""]
    ev = results["eval"]["label_position"]
    lines += [f"label-position evaluation: {ev['flops_per_pass'] / 1e9:.2f} GFLOP per pass, {ev['achieved_flops_per_second'] / 1e9:.1f} GFLOP/s", ""]
    if "release_comparison" in results:
        rc, rel = results["release_comparison"], results["training"]["SPUL, release-style"]
        lines += [f"SPUL against the release-style step ({rc['what']}):", "", "| figure | SPUL | release-style | SPUL / release |", "|---|---|---|---|"]
        spul = results["training"]["SPUL"]
        lines.append(f"| step s (median) | {spul['step_seconds_median']:.3f} | {rel['step_seconds_median']:.3f} | {rc['step_seconds_ratio_spul_to_release']:.2f}x |")
        first, pre = spul.get("first_visit_reference_seconds_per_step"), rel.get("precompute_seconds_bench_rows")
        if first is not None and pre is not None:  # the reference outside the timed step, for both
            per_batch = pre / max(len(results["training"]["SPUL"]["step_seconds"]) + meta["warmup_steps"], 1)
            lines.append(f"| reference outside the step, s per batch (SPUL: its first epoch's forward; release: its precompute) | "
                         f"{first:.3f} | {per_batch:.3f} | |")
        lines.append(f"| train tokens/s | {spul['tokens_per_second']:.1f} | {rel['tokens_per_second']:.1f} | "
                     f"{spul['tokens_per_second'] / rel['tokens_per_second']:.2f}x |")
        if rc["flops_per_step_ratio_spul_to_release"] is not None:
            lines.append(f"| GFLOP/step | {statistics.mean(spul['flops_per_step']) / 1e9:.2f} | {statistics.mean(rel['flops_per_step']) / 1e9:.2f} | "
                         f"{rc['flops_per_step_ratio_spul_to_release']:.2f}x |")
            lines.append(f"| achieved FLOP/s / matmul peak | {100 * spul['share_of_matmul_peak']:.1f}% | {100 * rel['share_of_matmul_peak']:.1f}% | |")
        lines += [f"| step s of {name} / release-style | | | {ratio:.2f}x |" for name, ratio in rc["step_seconds_ratio_to_release"].items() if name != "SPUL"]
        lines.append(f"| peak memory (same accounting) | {SHOW['bytes'](rc['spul_peak_bytes_same_accounting'])} | {SHOW['bytes'](rc['release_peak_bytes'])} | "
                     f"{rc['spul_peak_ratio_to_release_peak']:.2f}x |")
        lines.append(f"| peak memory / one model copy | {rc['spul_peak_ratio_to_one_model_copy_same_accounting']:.2f}x | "
                     f"{rc['release_peak_ratio_to_one_model_copy']:.2f}x | |")
        lines += ["", f"release-style reference: model copy {SHOW['bytes'](rel['reference_copy_bytes'])}, logit cache of the training set "
                      f"{SHOW['bytes'](rel['reference_cache_bytes_training_set'])} ({rel['reference_cache_what']})", ""]
    tc = results.get("levers", {}).get("torch_compile")
    if tc and "error" not in tc:
        lines += [f"torch.compile (decoder layers, dynamic): compile + first step {tc['compile_and_first_step_seconds']:.1f} s; "
                  f"then {tc['compiled_step_seconds_median']:.3f} s against eager {tc['eager_step_seconds_median']:.3f} s "
                  f"({tc['compiled_to_eager']:.3f}x, {tc['pairs']} pairs); loss changes by {tc['loss_relative_difference']:.1e} (relative)", ""]
    elif tc:
        lines += [f"torch.compile: {tc['error']}", ""]
    lines += ["| figure | achieved | target | met |", "|---|---|---|---|"]
    lines += [f"| {t['figure']} | {t['achieved_text']} ({t['numerator']} / {t['denominator']}) | {t['target']}{' (informational)' if t['informational'] else ''} | "
              f"{'met' if t['met'] else 'NOT met'} |" for t in results["targets"]]
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.machine()} ({os.cpu_count()} cores)"


def default_out(args) -> Path:
    suffix = "-profile" if args.profile else ""
    return Path("runs") / "bench" / f"{Path(str(args.model_name)).name}-{args.dataset}{suffix}.json"


def setup_figures(args, device, dtype, argv) -> dict:
    return {"model_name": args.model_name, "dataset": args.dataset, "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "batch_size": args.batch_size,
            "eval_batch_size": args.eval_batch_size, "max_length": args.max_length, "ptuning_num_tokens": args.ptuning_num_tokens,
            "beta": args.beta, "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
            "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}


def profile_main(args, device, dtype, model_path, tokenizer, encoder, splits, argv, t_start) -> dict:
    load_start = os.getloadavg()
    workloads = run_profile(args, device, model_path, tokenizer, encoder, splits)
    setup = {**setup_figures(args, device, dtype, argv), "profile_baseline_batch_size": args.profile_baseline_batch_size,
             "load_average_start": load_start, "load_average_end": os.getloadavg(), "wall_seconds": time.perf_counter() - t_start}
    results = {"setup": setup, "categories": list(CATEGORIES), "workloads": workloads}
    out = Path(args.out) if args.out else default_out(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    table = format_profile(workloads, setup)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nJSON: {out}, markdown: {out.with_suffix('.md')} ({setup['wall_seconds']:.0f} s)")
    return results


@cli.entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    targets = read_targets(args.targets)  # before any model loads
    t_start = time.perf_counter()
    seed_everything(args.seed)  # --threads is applied by cli.check_common
    device = select_device()
    dtype = compute_dtype(device)
    args.matmul_size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    load_start = os.getloadavg()

    data = cli.data_config(args)
    splits = prepare_splits(data)
    model_path = resolve_model(args.model_name)
    tokenizer = load_tokenizer(model_path, args.set_pad_id)
    encoder = Encoder(tokenizer, args.max_length, task=data.task)
    cli.check_max_length(encoder, data.task.all_words)
    if args.profile:
        return profile_main(args, device, dtype, model_path, tokenizer, encoder, splits, argv, t_start)
    bench = Bench(args, device, model_path, tokenizer, build_data(args, encoder, splits), dtype)
    rss_before_model = rss_bytes()

    print("SPUL memory run", file=sys.stderr)
    spul_memory_run(bench, rss_before_model)
    bench.data.vocab_size = unwrap(bench.spul_model).get_output_embeddings().weight.size(0)
    print("evaluation and inference", file=sys.stderr)
    bench.results["eval"] = measure_eval(bench)
    eval_flops(bench, bench.results["eval"])
    print("building the methods", file=sys.stderr)
    trainers = [t for build in TRAINER_BUILDERS for t in build(bench)]
    for t in trainers:
        t.extra = t.prepare(t) if t.prepare else {}
    peaks = [matmul_peak(args.matmul_size, dtype, device)]
    print("training steps", file=sys.stderr)
    run_rounds(bench, trainers, peaks)
    count_flops(bench, trainers)
    bench.results["matmul_peak_flops_per_second"] = max(peaks)
    bench.results["matmul_peak_samples"] = peaks
    bench.results["training"] = {t.name: trainer_row(t, max(peaks), device.type == "cuda") for t in trainers}
    label_eval = bench.results["eval"]["label_position"]
    label_eval["share_of_matmul_peak"] = label_eval["achieved_flops_per_second"] / max(peaks)
    bench.results["release_comparison"] = release_comparison(bench, {t.name: t for t in trainers})
    if args.levers:
        print("levers", file=sys.stderr)
        bench.results["levers"] = measure_levers(bench, {t.name: t for t in trainers}, training_set(encoder, splits, args.seed))
    if args.compile_lever:
        print("torch.compile lever", file=sys.stderr)
        bench.results.setdefault("levers", {})["torch_compile"] = compile_lever(bench, next(t for t in trainers if t.name == "SPUL"))

    results = {
        "setup": {
            "model_name": args.model_name, "dataset": args.dataset, "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "batch_size": args.batch_size,
            "eval_batch_size": args.eval_batch_size, "steps": args.steps, "warmup_steps": args.warmup_steps, "eval_batches": args.eval_batches,
            "eval_rounds": args.eval_rounds, "matmul_size": args.matmul_size, "ptuning_num_tokens": args.ptuning_num_tokens,
            "beta": args.beta, "max_length": args.max_length, "seq_len_mean": float(np.mean([len(f["input_ids"]) for f in bench.data.plain])),
            "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
            "load_average_start": load_start, "load_average_end": os.getloadavg(), "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        },
        **bench.results,
    }
    results["targets"] = evaluate_targets(results, targets)
    results["setup"]["wall_seconds"] = time.perf_counter() - t_start
    out = Path(args.out) if args.out else default_out(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(format_report(results))
    print(f"\nJSON: {out} ({results['setup']['wall_seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
