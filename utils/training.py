"""One small training loop shared by qlora.py, spul.py, baselines.py and utils/relearn.py, on
accelerate's ``Accelerator``: AdamW, cosine schedule with linear warmup, gradient clipping,
seeded shuffling, gradient accumulation, mixed precision, optional activation checkpointing, a
progress bar, and an efficiency record (wall time per epoch, tokens/s, peak memory, trainable
parameters).

One optimiser step takes ``batch_size * gradient_accumulation_steps`` samples (the step batch,
drawn by ``epoch_batches``); it is cut into micro-batches of ``batch_size`` samples, one forward
and backward each, and each micro-batch is dealt out over the processes (``batch[rank::world]``).
``--train_batch_size`` is thus the number of samples per forward summed over all processes.

Exact across processes and accumulation steps: a loss function that sets ``global_counts = True``
(SPUL, every baseline, qlora.py's CE) finds the step batch's counts in ``batch["global_counts"]``
(``utils.losses.global_count``) and returns its share of the step's means (local sums divided
by global counts); the loop multiplies it by ``world * accumulation`` before
``accelerator.backward`` (which divides by the accumulation steps), so that DDP's gradient
*mean* over the processes is the gradient of the step's loss. Any other loss function is taken
to be a per-example mean over its batch and weighted by its share of the step's samples.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from utils import distributed
from utils.forward import to_device, unwrap
from utils.lean_mlp import lean_mlps
from utils.losses import GLOBAL_COUNTS
from utils.template import collate
from utils.trackers import Trackers


class LaunchError(ValueError):
    """A training setting this loop cannot run (precision, accumulation, sharded checkpoints,
    an unsupported accelerate config); one line naming the flag or config. A user error."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def peak_memory_mb(device) -> float:
    """Peak allocated CUDA memory on GPU; peak resident set size of the process on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class TrainConfig:
    lr: float
    num_epochs: float
    batch_size: int
    weight_decay: float = 0.001
    warmup_ratio: float = 0.05
    max_grad_norm: float = 0.3
    seed: int = 42
    log_every: int = 10
    checkpoint_dir: str | None = None  # where resumable checkpoints go (None: no checkpoints)
    save_every: int = 0  # steps between checkpoints (0: none)
    resume: bool = False  # continue from the checkpoint in checkpoint_dir if there is one
    fingerprint: dict | None = None  # what the run was started with, stored in each checkpoint
    group_by_length: int = 0  # >0: length-grouped batches, megabatches of this many batches
    stratify_batches: bool = False  # every batch holds the same share of forget samples (+-1)
    gradient_accumulation_steps: int = 1  # micro-batches of batch_size per optimiser step
    mixed_precision: str = "no"  # "auto" (bf16 on CUDA where supported, else fp16; no on CPU), "no", "bf16", "fp16"
    gradient_checkpointing: bool = False  # activation checkpointing (CUDA only; ignored on CPU)
    ema_decay: float = 0.0  # >0: train, save and evaluate an exponential moving average of the weights (WeightAverage)
    lean_mlp: bool = True  # SwiGLU MLPs save 2 tensors for the backward, not 3 (utils.lean_mlp; bit-identical)
    report_to: str = "none"  # experiment tracker (utils.trackers): "none", "tensorboard", "wandb"
    tracker_dir: str | None = None  # where the tracker writes (utils.trackers.default_tracker_dir)
    tracker_project: str | None = None  # wandb project (default "spul")
    run_name: str | None = None  # tensorboard subfolder / wandb run name
    tracker_config: dict | None = None  # hyper-parameters stored with the tracker run


@dataclass
class TrainStats:
    trainable_params: int = 0
    steps: int = 0
    epoch_seconds: list = field(default_factory=list)
    train_tokens: int = 0
    tokens_per_second: float = 0.0
    peak_memory_mb: float = 0.0
    losses: list = field(default_factory=list)  # (step, loss, {term: value})
    processes: int = 1  # data-parallel processes (utils.distributed)
    gradient_accumulation_steps: int = 1  # micro-batches per optimiser step
    mixed_precision: str = "no"  # what "auto" resolved to, or the value asked for
    ema_decay: float = 0.0  # >0: the weights returned are the moving average (WeightAverage)
    epoch_means: list = field(default_factory=list)  # per epoch: {"loss": .., term: ..}, each the mean of its steps' values
    epoch_sums: dict = field(default_factory=dict)  # the running epoch's sums (kept in checkpoints, not in train_stats.json)
    epoch_steps: int = 0  # the running epoch's steps so far

    def record(self, loss: float, terms: dict) -> None:
        """Add one optimiser step's loss and numeric terms to the running epoch."""
        self.epoch_steps += 1
        for k, v in {"loss": loss, **terms}.items():
            if isinstance(v, (int, float)):
                self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + float(v)

    def end_epoch(self) -> None:
        """Close the running epoch: its mean of every recorded value joins ``epoch_means``."""
        if self.epoch_steps:
            self.epoch_means.append({k: v / self.epoch_steps for k, v in self.epoch_sums.items()})
        self.epoch_sums, self.epoch_steps = {}, 0

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("epoch_sums", "epoch_steps")}
        d["seconds_per_epoch"] = sum(self.epoch_seconds) / max(len(self.epoch_seconds), 1)
        return d


def stratified_order(groups, rng: np.random.Generator) -> np.ndarray:
    """A seeded permutation in which each group's members are spread evenly: a member of a
    group of n gets the key (rank + u) / n, with its rank in a shuffle of its group and u
    uniform in [0, 1); sorting by the key deals the groups out in proportion, so that any run
    of b consecutive samples holds b * n / N members of the group, within two (nearly always within one)."""
    groups = np.asarray(groups)
    keys = np.empty(len(groups))
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        ranks = rng.permutation(len(members))
        keys[members] = (ranks + rng.random(len(members))) / len(members)
    return np.argsort(keys, kind="stable")


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, lengths=None, group: int = 0, strata=None) -> list[list[int]]:
    """A seeded shuffle per epoch; forget and retain samples mix in the same batches.

    With ``strata`` (one group id per sample, e.g. is_forget) the shuffle is stratified
    (``stratified_order``): every batch holds the same share of each group, within two samples (nearly always one),
    instead of a share that varies from batch to batch (with 1/3 forget samples and batch 8, a
    plain shuffle gives 0 to 6 of them; each loss term is a mean over its own samples, so a
    batch with one forget sample puts the whole weight of L_f on it).

    With ``lengths`` and ``group`` > 0 the batches are length-grouped: the shuffled order is cut
    into megabatches of ``group`` batches, each megabatch is sorted by length (longest first) and
    cut into batches, and the order of all batches is shuffled again. Each batch still draws
    from a random share of the data, with less padding (``collate`` pads to the longest row)."""
    rng = np.random.default_rng([seed, epoch])
    perm = stratified_order(strata, rng) if strata is not None else rng.permutation(n)
    if not group or lengths is None:
        return [perm[i : i + batch_size].tolist() for i in range(0, n, batch_size)]
    size = group * batch_size
    batches = []
    for s in range(0, n, size):
        chunk = sorted(perm[s : s + size].tolist(), key=lambda i: -lengths[i])  # stable
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[k] for k in rng.permutation(len(batches))]


CKPT = "last"
OLD = ".last.old"
STATE_JSON = "state.json"


def _named(model, params) -> dict[str, torch.Tensor]:
    ids = {id(p) for p in params}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


class WeightAverage:
    """Exponential moving average of the trainable weights (``--ema_decay``): after optimiser
    step t (1, 2, ...) each average ``a`` becomes ``r * a + (1 - r) * w`` with
    ``r = min(decay, (1 + t) / (10 + t))``, so that the first steps, far from where training
    ends, fade out quickly. Kept in float32 beside the weights; ``copy_to`` writes it into them
    once training ends. The averaged run is a different run: its checkpoints carry the average
    (``ema.<name>`` in ``trainable.safetensors``), and ``--resume`` restores it exactly."""

    PREFIX = "ema."

    def __init__(self, named: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.params = named
        self.avg = {n: p.detach().float().clone() for n, p in named.items()}

    def rate(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        r = self.rate(step)
        for n, p in self.params.items():
            self.avg[n].mul_(r).add_(p.detach().float(), alpha=1 - r)

    @torch.no_grad()
    def copy_to(self) -> None:
        for n, p in self.params.items():
            p.copy_(self.avg[n].to(p.dtype))

    def state(self) -> dict[str, torch.Tensor]:
        return {self.PREFIX + n: a.cpu().contiguous() for n, a in self.avg.items()}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore from a checkpoint's tensors; where it holds no average, from the weights."""
        for n, p in self.params.items():
            self.avg[n].copy_(tensors.get(self.PREFIX + n, p.detach()).to(self.avg[n].device, torch.float32))


def checkpoint_path(folder: Path) -> Path | None:
    """The complete checkpoint in ``folder`` (``last/``, or ``.last.old/`` when a save was cut
    off between its two renames), or None."""
    for name in (CKPT, OLD):
        if (Path(folder) / name / STATE_JSON).is_file():
            return Path(folder) / name
    return None


def read_checkpoint_info(folder: Path) -> dict | None:
    """``{"steps": ..., "fingerprint": ...}`` of the checkpoint in ``folder`` (JSON only, no
    tensors), or None when there is none."""
    path = checkpoint_path(folder)
    if path is None:
        return None
    state = json.loads((path / STATE_JSON).read_text())
    return {"steps": state["stats"]["steps"], "fingerprint": state.get("fingerprint"), "path": str(path)}


def save_checkpoint(folder: Path, model, params, optimizer, scheduler, stats: "TrainStats", fingerprint=None,
                    average: WeightAverage | None = None) -> None:
    """Trainable weights (``trainable.safetensors``), optimizer tensors and RNG states
    (``optimizer.safetensors``), optimizer hyper-parameters, scheduler, progress and the run's
    fingerprint (``state.json``): safetensors and JSON only, nothing pickled. Written to a
    temporary folder and moved into place, so a crash mid-save keeps the previous checkpoint."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder / f".{CKPT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {n: p.detach().cpu().contiguous() for n, p in _named(model, params).items()}
    save_file({**weights, **(average.state() if average is not None else {})}, tmp / "trainable.safetensors")
    opt = optimizer.state_dict()
    tensors, other = {}, {}
    for i, entry in opt["state"].items():
        for k, v in entry.items():
            if torch.is_tensor(v):
                tensors[f"state.{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                other.setdefault(str(i), {})[k] = v
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for k, r in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{k}"] = r
    save_file(tensors, tmp / "optimizer.safetensors")
    state = {
        "optimizer_param_groups": opt["param_groups"],
        "optimizer_state_other": other,
        "scheduler": scheduler.state_dict(),
        "stats": dict(stats.__dict__),
        "fingerprint": fingerprint,
    }
    (tmp / STATE_JSON).write_text(json.dumps(state))
    old = folder / OLD
    shutil.rmtree(old, ignore_errors=True)
    if (folder / CKPT).exists():
        os.replace(folder / CKPT, old)
    os.replace(tmp, folder / CKPT)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, model, params, optimizer, scheduler, stats: "TrainStats",
                    average: WeightAverage | None = None) -> bool:
    """Restore a checkpoint written by ``save_checkpoint``; False if there is none."""
    from safetensors.torch import load_file

    path = checkpoint_path(Path(folder))
    if path is None:
        return False
    weights = load_file(path / "trainable.safetensors")
    with torch.no_grad():
        for n, p in _named(model, params).items():
            p.copy_(weights[n].to(p.device, p.dtype))
    if average is not None:
        average.load(weights)
    state = json.loads((path / STATE_JSON).read_text())
    tensors = load_file(path / "optimizer.safetensors")
    opt_state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("state."):
            _, i, name = key.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v
    for i, entry in state["optimizer_state_other"].items():
        opt_state.setdefault(int(i), {}).update(entry)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state["optimizer_param_groups"]]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict(state["scheduler"])
    stats.__dict__.update(state["stats"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return True


MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


def resolve_mixed_precision(choice: str, device, params=()) -> str:
    """``--mixed_precision``: "auto" is bf16 on a CUDA device that supports it, else fp16 (or
    "no" when a trainable parameter is not fp32: the fp16 gradient scaler cannot unscale
    half-precision gradients), and "no" off CUDA (CPU stays fp32)."""
    if choice not in MIXED_PRECISION:
        raise ValueError(f"mixed precision {choice!r}: choose from {', '.join(MIXED_PRECISION)}")
    on_cuda = torch.device(device).type == "cuda"
    if choice != "auto":
        if choice == "fp16" and not on_cuda:
            raise LaunchError("--mixed_precision fp16: needs a CUDA device (use bf16 or no on CPU)")
        return choice
    if not on_cuda:
        return "no"
    if torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp16" if all(p.dtype == torch.float32 for p in params) else "no"


class _Step(torch.nn.Module):
    """The model and its loss as one module, so that ``accelerator.prepare`` wraps the whole
    training forward (DDP's gradient hooks, FSDP's unsharding, DeepSpeed's engine, autocast)
    while the loss function still receives the unwrapped model (PEFT helpers such as
    ``disable_adapter`` or the prompt encoder stay reachable)."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def make_accelerator(cfg: TrainConfig, device, params, trackers=None):
    """A fresh ``Accelerator`` for one ``train`` call (accelerate's state is per process: it
    is reset so that each call may ask for its own precision and accumulation), with the
    experiment tracker of ``trackers`` (``utils.trackers.Trackers``) if any."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if distributed.launched_world_size() > 1:
        distributed.state()  # the process group, with this toolkit's timeout
    precision = resolve_mixed_precision(cfg.mixed_precision, device, params)
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accum = max(1, int(cfg.gradient_accumulation_steps))
    accelerator = Accelerator(
        cpu=torch.device(device).type == "cpu", mixed_precision=precision, gradient_accumulation_steps=accum,
        device_placement=False,  # the callers place the model (4-bit models cannot be moved) and the batches
        step_scheduler_with_optimizer=False, **(trackers.accelerator_kwargs() if trackers is not None else {}),
    )
    if accelerator.gradient_accumulation_steps != accum:  # ACCELERATE_GRADIENT_ACCUMULATION_STEPS from a launcher config
        raise LaunchError(f"--gradient_accumulation_steps {accum}: the accelerate config asks for "
                         f"{accelerator.gradient_accumulation_steps}; pass the same value or drop it from the config")
    return accelerator, precision


def enable_gradient_checkpointing(model, device, say: bool) -> bool:
    """Activation checkpointing on CUDA (non-reentrant); ignored with a one-line warning on CPU.
    SPUL then prepends its prompt instead of using the prompt KV cache (``cache_compatible``)."""
    if torch.device(device).type != "cuda":
        if say:
            print("warning: --gradient_checkpointing is ignored on CPU (it only saves GPU memory)", file=sys.stderr)
        return False
    unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return True


def check_sharding(accelerator, kind: str) -> None:
    """The sharded setups the loop cannot hand back a whole trained model from (the entry points
    evaluate and save the model after ``train``): one line each."""
    if kind == "FSDP" and getattr(accelerator, "is_fsdp2", False):
        raise LaunchError("accelerate launch: FSDP2 (fsdp_version: 2) is not supported; use fsdp_version: 1 "
                         "(scripts/accelerate/fsdp_7b_full.yaml)")
    if kind == "DEEPSPEED" and getattr(accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3:
        raise LaunchError("accelerate launch: DeepSpeed ZeRO-3 is not supported (evaluation after training needs the "
                         "whole weights in each process); use ZeRO-2 (scripts/accelerate/deepspeed_zero2.yaml) or FSDP")


def gather_fsdp(step_module, device, trainable: dict) -> None:
    """After FSDP (version 1) training: put the whole trained weights back into the caller's
    module tree in every process (the FSDP wrappers replaced by the modules they wrap), so that
    evaluation and saving see a plain model, as after DDP. Every process holds a full copy
    afterwards (CPU while it is gathered)."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(step_module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=False)):
        full = step_module.state_dict()  # keys of _Step: "model.<name in the caller's model>"
    inner = step_module.module

    def strip(parent):
        for name, child in list(parent.named_children()):
            if isinstance(child, FSDP):
                child = child.module
                setattr(parent, name, child)
            strip(child)

    strip(inner)
    for key, value in full.items():
        owner, _, leaf = key.rpartition(".")
        module = inner.get_submodule(owner)
        if leaf in module._buffers:
            module._buffers[leaf] = value.to(device)
            continue
        if leaf in module._parameters:
            del module._parameters[leaf]
        elif hasattr(module, leaf):
            delattr(module, leaf)  # a view FSDP left as a plain attribute
        name = key.split(".", 1)[1]
        module.register_parameter(leaf, torch.nn.Parameter(value.to(device), requires_grad=trainable.get(name, False)))
    model = inner.model
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def step_counts(features, idx) -> dict:
    """The counts the loss terms are normalised by: samples, forget and retain samples of the
    whole step batch ``idx`` (known on every process: all see the same ``idx``)."""
    forget = sum(bool(features[i].get("is_forget", False)) for i in idx)
    return {"all": len(idx), "forget": forget, "retain": len(idx) - forget}


def micro_batches(idx: list[int], batch_size: int, pad_to: int = 0) -> list[list[int]]:
    """The step batch cut into micro-batches of ``batch_size`` (the last may be shorter),
    padded with empty ones up to ``pad_to`` (DeepSpeed expects a fixed number per step)."""
    out = [idx[j : j + batch_size] for j in range(0, len(idx), batch_size)]
    return out + [[] for _ in range(pad_to - len(out))]


def train(model, params, loss_fn, features, cfg: TrainConfig, device, pad_id, desc="train", trackers=None) -> TrainStats:
    """Minimise ``loss_fn(model, batch) -> (loss, {term: float})`` over ``features``.
    A fractional ``num_epochs`` trains on that share of the last epoch's batches. With
    ``cfg.checkpoint_dir`` and ``cfg.save_every`` it saves a resumable checkpoint every
    ``save_every`` steps; with ``cfg.resume`` it continues from it, exactly (same batches,
    optimizer, schedule and dropout RNG). ``stats.epoch_means`` holds each epoch's mean of the
    steps' loss and terms (every step, not only the logged ones).

    A step is one optimiser update over ``cfg.batch_size * cfg.gradient_accumulation_steps``
    samples; under a launcher with several processes each takes its share of every micro-batch
    and accelerate (DDP, FSDP or DeepSpeed) reduces the gradients; with ``loss_fn.global_counts``
    the loss and its gradient are those of one process on the whole step batch (see the module
    docstring). Only the main process saves checkpoints and shows progress.

    Experiment tracking (``cfg.report_to``, ``utils.trackers``): every recorded step (the
    entries of ``stats.losses``) is logged with its learning rate. With ``trackers`` (the
    caller's ``utils.trackers.Trackers``) the trackers stay open for the caller to log the
    evaluation and close them (closed here only if training fails); without it ``train`` opens
    its own from ``cfg`` and closes them when it returns."""
    own_trackers = trackers is None
    trackers = Trackers(cfg) if own_trackers else trackers
    params = [p for p in params if p.requires_grad]
    try:
        with lean_mlps(model, cfg.lean_mlp):
            stats = _train(model, params, loss_fn, features, cfg, device, pad_id, desc, trackers)
    except BaseException:
        trackers.close()
        raise
    if own_trackers:
        trackers.close()
    return stats


def _train(model, params, loss_fn, features, cfg, device, pad_id, desc, trackers) -> TrainStats:
    accelerator, precision = make_accelerator(cfg, device, params, trackers)
    world, main_rank = accelerator.num_processes, accelerator.is_main_process
    rank = accelerator.process_index
    accum = accelerator.gradient_accumulation_steps
    kind = str(accelerator.distributed_type).split(".")[-1]
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if kind in ("FSDP", "DEEPSPEED") and ckpt_dir is not None and (cfg.save_every or cfg.resume):
        raise LaunchError(f"--save_every/--resume: checkpoints are not supported under {kind} (the weights are sharded); pass --save_every 0")
    if kind in ("FSDP", "DEEPSPEED") and cfg.ema_decay:
        raise LaunchError(f"--ema_decay: the weight average is not supported under {kind} (the weights are sharded); pass --ema_decay 0")
    check_sharding(accelerator, kind)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, device, main_rank)
    uses_counts = bool(getattr(loss_fn, "global_counts", False))
    stats = TrainStats(trainable_params=sum(p.numel() for p in params), processes=world,
                       gradient_accumulation_steps=accum, mixed_precision=precision, ema_decay=cfg.ema_decay)
    average = WeightAverage(_named(model, params), cfg.ema_decay) if cfg.ema_decay else None
    step_size = cfg.batch_size * accum
    per_epoch = math.ceil(len(features) / step_size)
    total = max(1, math.ceil(per_epoch * cfg.num_epochs))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    if cfg.resume and ckpt_dir is not None and load_checkpoint(ckpt_dir, model, params, optimizer, scheduler, stats, average):
        stats.processes, stats.gradient_accumulation_steps, stats.mixed_precision = world, accum, precision
        if main_rank:
            print(f"{desc}: resumed from {ckpt_dir} at step {stats.steps}/{total}")
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    if kind == "DEEPSPEED":  # no dataloader is prepared: the loop's sizes and clipping go into the config
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds.update(train_micro_batch_size_per_gpu=math.ceil(cfg.batch_size / world), gradient_accumulation_steps=accum,
                  gradient_clipping=cfg.max_grad_norm)
    trackers.start(accelerator)
    # DDP broadcasts rank 0's weights here; the loss sees the unwrapped model inside the wrapper
    step_module, step_optimizer = accelerator.prepare(_Step(model, loss_fn), optimizer)
    clip_params = list(step_module.parameters()) if kind == "FSDP" else params
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    bar = tqdm(total=total, initial=stats.steps, desc=desc, unit="step", disable=not main_rank)
    t_all = time.perf_counter()
    epoch, skip = divmod(stats.steps, per_epoch)
    lengths = [len(f["input_ids"]) for f in features] if cfg.group_by_length else None
    strata = [bool(f.get("is_forget", False)) for f in features] if cfg.stratify_batches else None
    try:
        while stats.steps < total:
            t0 = time.perf_counter()
            for idx in epoch_batches(len(features), step_size, cfg.seed, epoch, lengths, cfg.group_by_length, strata)[skip:]:
                if stats.steps >= total:
                    break
                loss, terms, tokens = _step(accelerator, step_module, features, idx, cfg.batch_size, device, pad_id,
                                            uses_counts, rank, world, accum, kind, stats.steps + 1)
                accelerator.clip_grad_norm_(clip_params, cfg.max_grad_norm)
                lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler steps after it)
                step_optimizer.step()
                if not step_optimizer.step_was_skipped:  # fp16: a step skipped for overflowing gradients
                    scheduler.step()
                step_optimizer.zero_grad(set_to_none=True)
                stats.steps += 1
                if average is not None:
                    average.update(stats.steps)
                stats.train_tokens += tokens
                stats.record(loss, terms)
                if stats.steps % cfg.log_every == 0 or stats.steps == total:
                    stats.losses.append((stats.steps, loss, terms))
                    trackers.log_step(stats.steps, loss, terms, lr)
                bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch + 1)
                bar.update(1)
                if ckpt_dir is not None and cfg.save_every and stats.steps % cfg.save_every == 0 and stats.steps < total and main_rank:
                    save_checkpoint(ckpt_dir, model, params, optimizer, scheduler, stats, cfg.fingerprint, average)
            stats.epoch_seconds.append(time.perf_counter() - t0)
            stats.end_epoch()
            epoch, skip = epoch + 1, 0
        if kind == "FSDP":
            gather_fsdp(step_module, device, trainable)
    finally:
        bar.close()
        accelerator.free_memory()  # drop the DDP wrapper (its gradient hooks) and the prepared optimizer
        del step_module, step_optimizer
    if main_rank and stats.epoch_means:
        print(f"{desc}: mean loss by epoch " + " ".join(f"{m['loss']:.3g}" for m in stats.epoch_means))
    if average is not None:
        average.copy_to()  # the run's weights from here on: saved and evaluated by the caller
    elapsed = time.perf_counter() - t_all
    stats.tokens_per_second = stats.train_tokens / max(elapsed, 1e-9)
    stats.peak_memory_mb = peak_memory_mb(device)
    model.eval()
    return stats


def _step(accelerator, step_module, features, idx, batch_size, device, pad_id, uses_counts, rank, world, accum, kind, step_no):
    """Forward and backward of every micro-batch of the step batch ``idx`` (this process's
    share of each). Returns the step's loss, its terms and its number of tokens, summed over the
    micro-batches and processes (each forward's value weighted by its share of the step)."""
    counts = step_counts(features, idx)
    micro = micro_batches(idx, batch_size, pad_to=accum if kind == "DEEPSPEED" else 0)
    loss_total, terms_total, tokens = 0.0, {}, 0
    for j, part in enumerate(micro):
        last = j == len(micro) - 1
        mine = part[rank::world]
        # a process without samples in this micro-batch still runs one (weight 0): DDP, FSDP and
        # DeepSpeed need every process in every forward/backward
        rows = mine or idx[:1]
        batch = to_device(collate([features[i] for i in rows], pad_id), device)
        if uses_counts:
            batch[GLOBAL_COUNTS] = counts
        weight = 0.0 if not mine else 1.0 if uses_counts else len(mine) / len(idx)
        accelerator.gradient_state._set_sync_gradients(last)  # DeepSpeed: step at the last micro-batch
        with contextlib.nullcontext() if last else accelerator.no_sync(step_module):
            loss, terms = step_module(batch)
            value = loss.item()
            finite = math.isfinite(value)
            if world > 1:  # every process stops together, before any gradient is reduced
                flag = torch.tensor([0.0 if finite else 1.0], device=accelerator.device)
                finite = float(accelerator.reduce(flag, reduction="sum").item()) == 0.0
            if not finite:
                raise TrainingDiverged(f"non-finite loss ({value if not math.isfinite(value) else float('nan')}) at step {step_no}")
            scale = weight * world * accum  # undone by DDP's mean over processes and backward's 1/accum
            accelerator.backward(loss if scale == 1.0 else loss * scale)
        if mine:
            loss_total += value if weight == 1.0 else value * weight
            for k, v in terms.items():
                if isinstance(v, (int, float)):
                    terms_total[k] = terms_total.get(k, 0.0) + (v if weight == 1.0 else v * weight)
            tokens += int(batch["num_tokens"].sum())
    accelerator.gradient_state._set_sync_gradients(True)
    if world > 1:
        parts = distributed.gather_objects((loss_total, terms_total, tokens))
        loss_total = sum(p[0] for p in parts)
        keys = list(dict.fromkeys(k for p in parts for k in p[1]))
        terms_total = {k: sum(p[1].get(k, 0.0) for p in parts) for k in keys}
        tokens = sum(p[2] for p in parts)
    return loss_total, terms_total, tokens
