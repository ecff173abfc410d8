"""One-GPU check of the toolkit's CUDA paths at the paper's model shapes: one summary table.

For each model shape (SmolLM2-135M, OPT-1.3B, LLaMA-2-7B) a few steps of each cell:

- ``qlora``: 4-bit NF4 base with bf16 compute (bitsandbytes, ``utils.models.load_4bit``), LoRA
  on q_proj/v_proj, label CE (qlora.py's step);
- ``spul``: soft prompt (p=30) on the frozen bf16 model, ``SpulObjective`` (alpha 1, beta 0.5)
  through the prompt's key/value cache, a batch of forget and retain samples (spul.py's step);
- ``ga_gd``: GA+GD full fine-tuning (baselines.py's loss); skipped with the stated estimate when
  it would not fit in free memory;
- ``inference``: ``utils.evaluation.predict`` (label-position logits, prompt cache) on one batch;

each with its median step time, tokens/s, peak allocated memory and a status (ok / skipped:
reason / failed: reason). An out-of-memory error fails that cell only; the check goes on.

The machine that runs it need not reach the Hugging Face hub or any package registry: the models
are built in code from their configurations with random weights (``from_config``), fed random
token ids. Random weights are enough for the CUDA paths, memory and speed; they say nothing
about quality. ``--cpu_smoke`` (for tests) runs the same code on CPU with tiny configurations
of each architecture, in fp32 and without 4-bit.

    bash scripts/gpu_check.sh                      # all three models, ~8 minutes on one GPU
    bash scripts/gpu_check.sh --models opt-1.3b --out runs/gpu_check-opt.json
    bash scripts/gpu_check.sh --dry-run            # the command only
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from utils.baselines import METHODS, NoReference, Weights, make_loss_fn
from utils.evaluation import predict
from utils.forward import to_device
from utils.models import add_lora, is_quantized_4bit, load_4bit, load_model, lora_config, lora_target_modules, prepare_for_training, select_device, short_reason
from utils.prompt import add_prompt, prompt_embeddings, trainable_parameters
from utils.spul_loss import SpulObjective
from utils.template import collate

NO_CUDA = "no CUDA device: this check needs a GPU; see --dry-run"
CAPTION = ("Random weights at the real configurations (built in code, no hub access): the figures check the "
           "CUDA paths, memory and speed, not model quality.")

# ---------------------------------------------------------------------------------------------
# Model shapes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    name: str
    arch: str  # "llama" or "opt"
    settings: dict
    expected_params: int  # published parameter count of the real checkpoint


SHAPES: dict[str, Shape] = {
    "smollm2-135m": Shape("smollm2-135m", "llama", dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
        vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0,
        rms_norm_eps=1e-5), 134_515_008),
    "opt-1.3b": Shape("opt-1.3b", "opt", dict(
        hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192, vocab_size=50272,
        word_embed_proj_dim=2048, max_position_embeddings=2048, tie_word_embeddings=True), 1_315_758_080),
    "llama-2-7b": Shape("llama-2-7b", "llama", dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
        vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096, rms_norm_eps=1e-5), 6_738_415_616),
}
CELLS = ("qlora", "spul", "ga_gd", "inference")
CELL_LABELS = {"qlora": "QLoRA (4-bit NF4 + LoRA)", "spul": "SPUL (prompt, frozen model)",
               "ga_gd": "GA+GD (full fine-tuning)", "inference": "inference (predict, prompt cache)"}
TINY_VOCAB = 256


def tiny_settings(shape: Shape) -> dict:
    """The same architecture shrunk for --cpu_smoke: hidden 64, 2 layers, 4 heads (2 key/value
    heads where the real model uses grouped-query attention), MLP 128, vocab 256."""
    s = dict(shape.settings, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=TINY_VOCAB,
             max_position_embeddings=512)
    if shape.arch == "llama":
        gqa = shape.settings["num_key_value_heads"] < shape.settings["num_attention_heads"]
        s.update(num_key_value_heads=2 if gqa else 4, intermediate_size=128)
    else:
        s.update(ffn_dim=128, word_embed_proj_dim=64)
    return s


def make_config(shape: Shape, tiny: bool = False):
    from transformers import LlamaConfig, OPTConfig

    settings = tiny_settings(shape) if tiny else dict(shape.settings)
    return (LlamaConfig if shape.arch == "llama" else OPTConfig)(**settings)


def build_model(shape: Shape, device, dtype, tiny: bool = False, seed: int | None = None):
    """A randomly initialised causal LM of ``shape``, created directly on ``device`` (the
    initialisation runs there: seconds for 7B on a GPU instead of minutes on the CPU)."""
    from transformers import AutoModelForCausalLM

    kind = torch.device(device).type
    # CPU (--cpu_smoke, tests): seeded without touching the caller's RNG state
    with torch.random.fork_rng(devices=[], enabled=kind == "cpu"), torch.device(device):
        if seed is not None and kind != "meta":
            torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(make_config(shape, tiny), dtype=dtype)
    return model


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights once


def meta_param_count(shape: Shape, tiny: bool = False) -> int:
    """Parameters of ``shape`` counted on the meta device: no weights are allocated."""
    return count_params(build_model(shape, "meta", torch.bfloat16, tiny))


# ---------------------------------------------------------------------------------------------
# Memory estimate of full fine-tuning
# ---------------------------------------------------------------------------------------------

GIB = 2**30


def size_text(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= 0.1 * GIB else f"{n / 2**20:.1f} MiB"
ACTIVATION_BYTES_PER_TOKEN_LAYER_HIDDEN = 34  # Korthikanti et al. 2022, 16-bit activations, fused attention


def ga_gd_bytes_per_param(weights: str, autocast: bool) -> tuple[float, str]:
    """Bytes per parameter at the peak of a full fine-tuning step with torch's AdamW (foreach,
    the default on CUDA, allocates one parameter-sized temporary in its update), and how."""
    if weights == "fp32":
        # step: weights 4 + grads 4 + AdamW m, v 8 + foreach temporary 4; during the backward the
        # bf16 autocast copies (2) are held while the grads (4) are only partly there
        return 20.0, ("fp32 weights 4 + fp32 grads 4 + AdamW fp32 m,v 8 + foreach AdamW temporary 4 = 20 B/param"
                      + (" (bf16 autocast copies, 2 B/param, live only during forward/backward)" if autocast else ""))
    return 10.0, "bf16 weights 2 + bf16 grads 2 + AdamW bf16 m,v 4 + foreach AdamW temporary 2 = 10 B/param"


def ga_gd_estimate(n_params: int, layers: int, hidden: int, batch: int, seq: int, weights: str, autocast: bool) -> dict:
    per_param, how = ga_gd_bytes_per_param(weights, autocast)
    activations = ACTIVATION_BYTES_PER_TOKEN_LAYER_HIDDEN * batch * seq * hidden * layers
    total = per_param * n_params + activations
    return {"bytes": total, "gib": total / GIB, "params": n_params, "bytes_per_param": per_param, "activation_bytes": activations,
            "short": f"{per_param:g} B/param x {n_params / 1e9:.2f}e9 params + {size_text(activations)} activations",
            "calculation": f"{how} x {n_params / 1e9:.3f}e9 params + activations "
                           f"{ACTIVATION_BYTES_PER_TOKEN_LAYER_HIDDEN} B x batch {batch} x seq {seq} x hidden {hidden} x {layers} layers "
                           f"({activations / GIB:.1f} GiB) = {total / GIB:.1f} GiB"}


def free_bytes(device, assume_free_gib: float | None) -> int | None:
    """Memory a new allocation can use: free device memory plus what PyTorch's caching allocator
    holds unused (CUDA), MemAvailable (CPU), or ``--assume_free_gib``."""
    if assume_free_gib is not None:
        return int(assume_free_gib * GIB)
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# Random batches
# ---------------------------------------------------------------------------------------------


def label_token_ids(vocab: int) -> tuple[list[int], list[int]]:
    """Stand-ins for the task labels' and the generic labels' first tokens."""
    return [vocab - 4, vocab - 3], [vocab - 2, vocab - 1]


def random_features(n: int, seq_len: int, vocab: int, seed: int, relabel_forget: bool) -> list[dict]:
    """``n`` encoded examples of ``seq_len`` random tokens, the last one a label token (so
    ``utils.template.collate`` puts the label-predicting position at seq_len - 2); the first
    third of every run of batches (at least one) are forget samples, carrying a generic label when
    ``relabel_forget``."""
    task, generic = label_token_ids(vocab)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 4, (n, seq_len), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g).tolist()
    feats = []
    for i in range(n):
        forget = i % 3 == 0
        word = generic[labels[i]] if forget and relabel_forget else task[labels[i]]
        row = ids[i].tolist()
        row[-1] = word
        feats.append({"input_ids": row, "label_ids": [word], "is_forget": forget, "label": labels[i], "index": i})
    return feats


def batches(features: list[dict], batch_size: int) -> list[list[int]]:
    return [list(range(s, s + batch_size)) for s in range(0, len(features), batch_size)]


# ---------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------


class Skip(Exception):
    """A cell that is not run; the message is the reason."""


@dataclass
class Row:
    model: str
    cell: str
    status: str = "ok"
    step_seconds_median: float | None = None
    tokens_per_second: float | None = None
    peak_gib: float | None = None
    step_seconds: list = field(default_factory=list)
    tokens_per_step: int | None = None
    trainable_params: int | None = None
    setup_seconds: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class Context:
    """What every cell of one model shape needs."""

    shape: Shape
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype  # weights of the frozen models (bf16 on CUDA, fp32 with --cpu_smoke)
    tiny: bool
    vocab: int
    pad_id: int = 0
    shared: dict = field(default_factory=dict)  # the prompted frozen model, shared by spul and inference

    @property
    def autocast(self) -> bool:
        """utils.training.train's --mixed_precision auto: bf16 autocast on CUDA where supported."""
        return self.device.type == "cuda" and self.dtype == torch.bfloat16

    def features(self, relabel_forget: bool) -> list[dict]:
        a = self.args
        return random_features((a.warmup_steps + a.steps) * a.batch_size, a.seq_len, self.vocab, a.seed, relabel_forget)

    def prompted(self):
        """The frozen model (``self.dtype``) with SPUL's soft prompt, built once per shape."""
        if "prompted" not in self.shared:

            model = build_model(self.shape, self.device, self.dtype, self.tiny, self.args.seed)
            self.shared["prompted"] = add_prompt(model, self.args.ptuning_num_tokens, self.args.ptuning_hidden_size, self.args.seed)
        return self.shared["prompted"]

    def release(self) -> None:
        self.shared.clear()
        free_memory(self.device)


def free_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def autocast_loss(loss_fn, enabled: bool):
    """The loss under bf16 autocast, as ``utils.training.train`` runs it on CUDA (the backward
    runs outside, as accelerate does); the loss function's attributes are kept."""
    if not enabled:
        return loss_fn

    def wrapped(model, batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return loss_fn(model, batch)

    wrapped.global_counts = getattr(loss_fn, "global_counts", False)
    return wrapped


def time_steps(ctx: Context, row: Row, step: Callable[[dict], None], features: list[dict]) -> None:
    """Warm-up steps, then ``--steps`` timed steps (bench.timed: synchronised clock), all inside
    one bench.PeakMemory (CUDA: torch.cuda.max_memory_allocated over the steps, the weights
    included; CPU: peak resident set size)."""
    from bench import PeakMemory, timed

    a = ctx.args
    times, tokens = [], []
    with PeakMemory(ctx.device) as mem:
        for k, idx in enumerate(batches(features, a.batch_size)):
            batch = to_device(collate([features[i] for i in idx], ctx.pad_id), ctx.device)
            seconds, _ = timed(lambda: step(batch), ctx.device)
            if k >= a.warmup_steps:
                times.append(seconds)
                tokens.append(int(batch["num_tokens"].sum()))
            print(f"  [{ctx.shape.name}] {row.cell} step {k + 1}/{a.warmup_steps + a.steps}: {seconds:.3f} s", file=sys.stderr)
    row.step_seconds = times
    row.step_seconds_median = statistics.median(times)
    row.tokens_per_step = tokens[0]
    row.tokens_per_second = statistics.median(tokens) / row.step_seconds_median
    row.peak_gib = mem.peak / GIB
    row.extra["peak_what"] = ("torch.cuda.max_memory_allocated over the steps" if ctx.device.type == "cuda"
                              else "CPU: peak resident set size of the process" + (" (lifetime)" if mem.lifetime else ""))


def train_steps(ctx: Context, row: Row, model, params, loss_fn, features, lr: float) -> None:
    """bench.Trainer's step (the step of utils.training.train: loss, backward, clipping at 0.3,
    AdamW with weight decay 0.001), the loss under autocast on CUDA."""
    from bench import Trainer, adamw

    params = [p for p in params if p.requires_grad]
    trainer = Trainer(row.cell, model, params, autocast_loss(loss_fn, ctx.autocast), features, adamw(params, lr))
    row.trainable_params = sum(p.numel() for p in params)
    model.train()
    time_steps(ctx, row, trainer.step, features)


def bitsandbytes_missing() -> str | None:
    """None when bitsandbytes imports, else the reason."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # noqa: BLE001 - ImportError, or a backend that fails at import

        return f"bitsandbytes not importable ({short_reason(error, 80)})"
    return None


def cell_qlora(ctx: Context, row: Row) -> None:
    """qlora.py's step: the bf16 model saved to a temporary folder and loaded back in 4-bit NF4
    (utils.models.load_4bit, bf16 compute), prepare_for_training (k-bit preparation, gradient
    checkpointing on CUDA), LoRA r=16 on q_proj/v_proj, label CE. --cpu_smoke: LoRA on the fp32
    model (no 4-bit), through the same save and load."""
    from qlora import label_ce

    quantize = not ctx.tiny
    if quantize:
        reason = bitsandbytes_missing()
        if reason:
            raise Skip(reason)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-", dir=ctx.args.tmp_dir) as folder:
        base = build_model(ctx.shape, ctx.device, ctx.dtype, ctx.tiny, ctx.args.seed)
        base.save_pretrained(folder)
        del base
        free_memory(ctx.device)
        if quantize:
            model = load_4bit(folder, ctx.device, ctx.dtype)
            if not is_quantized_4bit(model):
                raise RuntimeError("load_4bit returned a model that is not 4-bit")
        else:
            model, _ = load_model(folder, ctx.device, quantize=False, dtype=ctx.dtype)
    model = prepare_for_training(model, quantize, ctx.device)
    model = add_lora(model, lora_config(ctx.args.lora_rank, target_modules=lora_target_modules(model)))
    row.setup_seconds = time.perf_counter() - t0
    checkpointing = ", gradient checkpointing" if ctx.device.type == "cuda" else ""
    row.note = (f"4-bit NF4, {str(ctx.dtype).replace('torch.', '')} compute, LoRA r={ctx.args.lora_rank}{checkpointing}" if quantize
                else f"--cpu_smoke: LoRA r={ctx.args.lora_rank} on fp32, no 4-bit")
    train_steps(ctx, row, model, model.parameters(), label_ce, ctx.features(False), lr=1e-4)


def cell_spul(ctx: Context, row: Row) -> None:
    """spul.py's step: SpulObjective (alpha, beta) on the frozen model with the soft prompt,
    the prompt through its key/value cache, the KL reference on the fly (retain rows)."""

    t0 = time.perf_counter()
    model = ctx.prompted()
    row.setup_seconds = time.perf_counter() - t0
    a = ctx.args
    objective = SpulObjective(prompt_embeddings, a.alpha, a.beta)
    row.note = f"p={a.ptuning_num_tokens}, alpha={a.alpha:g}, beta={a.beta:g}, {str(ctx.dtype).replace('torch.', '')} frozen weights"
    train_steps(ctx, row, model, trainable_parameters(model), objective, ctx.features(True), lr=1e-4)
    row.extra["kl_reference_seconds_per_step"] = objective.cost()["reference_seconds_per_step"]


def cell_ga_gd(ctx: Context, row: Row) -> None:
    """baselines.py's GA+GD loss (utils.baselines.make_loss_fn), full fine-tuning of every
    weight; skipped when the stated estimate exceeds free memory."""

    a = ctx.args
    weights = "fp32" if ctx.tiny else a.ga_gd_weights
    dtype = torch.float32 if weights == "fp32" else torch.bfloat16
    cfg = make_config(ctx.shape, ctx.tiny)
    est = ga_gd_estimate(meta_param_count(ctx.shape, ctx.tiny), cfg.num_hidden_layers, cfg.hidden_size,
                         a.batch_size, a.seq_len, weights, ctx.autocast)
    free_memory(ctx.device)
    free = free_bytes(ctx.device, a.assume_free_gib)
    row.extra.update(estimate_gib=est["gib"], estimate=est["calculation"], free_gib=None if free is None else free / GIB)
    if free is not None and est["bytes"] > free:
        raise Skip(f"needs ~{est['gib']:.0f} GiB ({est['short']}), {free / GIB:.0f} GiB free")
    t0 = time.perf_counter()
    model = build_model(ctx.shape, ctx.device, dtype, ctx.tiny, ctx.args.seed)
    model.requires_grad_(True)
    row.setup_seconds = time.perf_counter() - t0
    method = METHODS["gradient_ascent_descent"]
    loss_fn = make_loss_fn(method, NoReference(), Weights(retain=1.0))
    row.note = (f"{weights} weights, AdamW {weights} states" + (", bf16 autocast" if ctx.autocast else "")
                + f"; estimate {size_text(est['bytes'])}")
    train_steps(ctx, row, model, model.parameters(), loss_fn, ctx.features(method.relabel_forget), lr=1e-5)


def cell_inference(ctx: Context, row: Row) -> None:
    """One ``utils.evaluation.predict`` call per step on one batch: the prompt's key/value cache
    built once per call, label-position logits, argmax and label log-probs."""

    t0 = time.perf_counter()
    model = ctx.prompted().eval()
    with torch.no_grad():
        prompt = prompt_embeddings(model).detach()
    row.setup_seconds = time.perf_counter() - t0
    task, _ = label_token_ids(ctx.vocab)
    feats = ctx.features(False)
    a = ctx.args
    row.note = f"p={a.ptuning_num_tokens} prompt cache, batch {a.batch_size}, {str(ctx.dtype).replace('torch.', '')}"

    def step(batch):  # the batch's own features, as predict collates them itself
        rows = batch["index"].tolist()
        predict(model, [feats[i] for i in rows], a.batch_size, ctx.device, ctx.pad_id, prompt, task, desc="inference")

    time_steps(ctx, row, step, feats)


CELL_FUNCTIONS: dict[str, Callable[[Context, Row], None]] = {
    "qlora": cell_qlora, "spul": cell_spul, "ga_gd": cell_ga_gd, "inference": cell_inference,
}
RUN_ORDER = ("spul", "inference", "qlora", "ga_gd")  # spul and inference share one model; the largest last


def is_oom(error: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(error, (oom, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def run_cell(ctx: Context, cell: str) -> Row:
    """One cell; Skip -> "skipped: reason", OOM -> "failed: out of memory" (memory freed), any
    other error -> "failed: <one line>". Never raises (except KeyboardInterrupt/SystemExit)."""

    row = Row(ctx.shape.name, cell)
    print(f"[{ctx.shape.name}] {cell}", file=sys.stderr)
    try:
        CELL_FUNCTIONS[cell](ctx, row)
    except Skip as reason:
        row.status = f"skipped: {reason}"
    except Exception as error:  # noqa: BLE001 - every failure is a table cell
        if is_oom(error):
            row.status = "failed: out of memory"
            row.extra["oom_detail"] = short_reason(error, 200)
        else:
            row.status = f"failed: {short_reason(error, 200)}"
    # outside the except block: the traceback (and the tensors its frames hold) is gone
    if row.status.startswith("failed") and cell in ("spul", "inference"):
        ctx.release()
    free_memory(ctx.device)
    if row.status == "failed: out of memory":
        free = free_bytes(ctx.device, None)
        row.extra["free_gib_after_freeing"] = None if free is None else free / GIB
    if row.status != "ok":
        row.step_seconds_median = row.tokens_per_second = row.peak_gib = None
    print(f"[{ctx.shape.name}] {cell}: {row.status}", file=sys.stderr)
    return row


def check_model(shape: Shape, args, device, dtype) -> list[Row]:
    vocab = TINY_VOCAB if args.cpu_smoke else shape.settings["vocab_size"]
    ctx = Context(shape, args, device, dtype, args.cpu_smoke, vocab)
    rows = {}
    try:
        for cell in (c for c in RUN_ORDER if c in args.cells):
            if cell not in ("spul", "inference"):
                ctx.release()  # the prompted frozen model is not needed any more
            rows[cell] = run_cell(ctx, cell)
    finally:
        ctx.release()
    return [rows[c] for c in CELLS if c in rows]


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

COLUMNS = ("model", "cell", "status", "median step s", "tokens/s", "peak GiB", "note")


def _num(value, fmt) -> str:
    return "-" if value is None else format(value, fmt)


def markdown_table(rows: list[Row], setup: dict) -> str:
    head = (f"## GPU check: {setup['device']}, torch {setup['torch']}, batch {setup['batch_size']} x seq {setup['seq_len']}, "
            f"median of {setup['steps']} steps after {setup['warmup_steps']} warm-up")
    caption = (f"{CAPTION} tokens/s: text tokens of a step (batch x seq; prompt positions not counted) / median step time. "
               f"peak GiB: {setup['peak_what']}, weights included.")
    lines = [head, "", caption, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r.model, CELL_LABELS[r.cell], r.status.replace("|", "/"), _num(r.step_seconds_median, ".3f"),
                 _num(r.tokens_per_second, ",.0f"), _num(r.peak_gib, ".2f"), r.note.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r.model} GA+GD memory estimate: {r.extra['estimate']}" for r in rows if r.cell == "ga_gd" and "estimate" in r.extra]
    return "\n".join(lines + ([""] + notes if notes else []))


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / GIB:.0f} GiB)"
    return f"CPU ({os.cpu_count()} cores, --cpu_smoke: tiny configurations, fp32, no 4-bit)"


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """One-line errors on stderr, exit status 2 (as utils.cli.Parser)."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m utils.gpu_check", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(SHAPES), default=list(SHAPES), metavar="MODEL",
                   help=f"model shapes to check, of {', '.join(SHAPES)}")
    p.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS), metavar="CELL",
                   help=f"cells to run per model, of {', '.join(CELLS)}")
    p.add_argument("--steps", type=int, default=3, help="timed steps per cell (the median is reported)")
    p.add_argument("--warmup_steps", type=int, default=1, help="untimed steps per cell before timing")
    p.add_argument("--batch_size", type=int, default=8, help="examples per step (a third of them forget samples, at least one)")
    p.add_argument("--seq_len", type=int, default=128, help="tokens per example (random ids; the last is the label)")
    p.add_argument("--ptuning_num_tokens", type=int, default=30, help="SPUL: prompt length p")
    p.add_argument("--ptuning_hidden_size", type=int, default=128, help="SPUL: hidden size of the prompt encoder's MLP")
    p.add_argument("--alpha", type=float, default=1.0, help="SPUL: weight of the retain CE")
    p.add_argument("--beta", type=float, default=0.5, help="SPUL: weight of the KL term")
    p.add_argument("--lora_rank", type=int, default=16, help="QLoRA: LoRA rank")
    p.add_argument("--ga_gd_weights", choices=("fp32", "bf16"), default="fp32",
                   help="GA+GD: fp32 weights and AdamW states under bf16 autocast (mixed-precision full fine-tuning), "
                        "or bf16 weights and AdamW states (what baselines.py gets when it loads the model in bf16)")
    p.add_argument("--seed", type=int, default=42, help="seed of the random weights, the prompt and the random token ids")
    p.add_argument("--tmp_dir", default=None, help="folder for the bf16 copy that QLoRA loads back in 4-bit (13 GB for LLaMA-2-7B; default: the system's temp folder)")
    p.add_argument("--out", default="runs/gpu_check.json", help="JSON file to write (the markdown table goes to stdout)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the plan (models, parameter counts, GA+GD memory estimates) and exit; needs no GPU")
    p.add_argument("--cpu_smoke", action="store_true",
                   help="for tests: the same code path on CPU with tiny configurations of each architecture, fp32, no 4-bit")
    p.add_argument("--assume_free_gib", type=float, default=None, help="for tests: take this many GiB as free memory (GA+GD's fit check)")
    return p


def check_args(args) -> None:
    for name in ("steps", "batch_size", "ptuning_num_tokens", "ptuning_hidden_size", "lora_rank"):
        if getattr(args, name) < 1:
            raise SystemExit(_usage(f"--{name} {getattr(args, name)}: must be at least 1"))
    if args.warmup_steps < 0:
        raise SystemExit(_usage("--warmup_steps must be >= 0"))
    if args.batch_size < 2:
        raise SystemExit(_usage("--batch_size must be at least 2 (a batch holds forget and retain samples)"))
    if args.seq_len < 3:
        raise SystemExit(_usage("--seq_len must be at least 3"))
    args.models = list(dict.fromkeys(args.models))
    args.cells = list(dict.fromkeys(args.cells))


def _usage(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def plan(args) -> str:
    lines = [f"gpu_check plan: cells {', '.join(args.cells)}; batch {args.batch_size} x seq {args.seq_len}; "
             f"{args.warmup_steps} warm-up + {args.steps} timed steps per cell"]
    for name in args.models:
        shape = SHAPES[name]
        cfg = make_config(shape)
        n = meta_param_count(shape)
        est = ga_gd_estimate(n, cfg.num_hidden_layers, cfg.hidden_size, args.batch_size, args.seq_len, args.ga_gd_weights, True)
        lines.append(f"- {name} ({shape.arch}): {n:,} parameters; GA+GD needs ~{est['gib']:.1f} GiB: {est['calculation']}")
    return "\n".join(lines)


def main(argv=None) -> dict | None:
    args = build_parser().parse_args(argv)
    check_args(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub
    if args.dry_run:
        print(plan(args))
        return None
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        sys.exit(2)

    device = torch.device("cpu") if args.cpu_smoke else select_device()
    dtype = torch.float32 if args.cpu_smoke else (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    t_start = time.perf_counter()
    rows: list[Row] = []
    for name in args.models:
        rows += check_model(SHAPES[name], args, device, dtype)
    setup = {
        "device": device_name(device), "cpu_smoke": args.cpu_smoke, "dtype": str(dtype).replace("torch.", ""),
        "models": args.models, "cells": args.cells, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "steps": args.steps, "warmup_steps": args.warmup_steps, "ptuning_num_tokens": args.ptuning_num_tokens,
        "alpha": args.alpha, "beta": args.beta, "lora_rank": args.lora_rank, "ga_gd_weights": args.ga_gd_weights,
        "peak_what": "torch.cuda.max_memory_allocated over the cell's steps" if device.type == "cuda" else "CPU peak resident set size of the process",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": package_version("transformers"),
        "peft": package_version("peft"), "bitsandbytes": package_version("bitsandbytes"), "python": platform.python_version(),
        "random_weights": True, "caption": CAPTION, "command": " ".join(["python -m utils.gpu_check"] + (list(argv) if argv is not None else sys.argv[1:])),
    }
    setup["wall_seconds"] = time.perf_counter() - t_start
    table = markdown_table(rows, setup)
    results = {"setup": setup, "columns": list(COLUMNS), "rows": [asdict(r) for r in rows], "table": table}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table)
    print(f"\nJSON: {out} ({setup['wall_seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
