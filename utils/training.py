"""One small training loop shared by qlora.py, spul.py and baselines.py: AdamW, cosine
schedule with linear warmup, gradient clipping, seeded shuffling, a progress bar, and an
efficiency record (wall time per epoch, tokens/s, peak memory, trainable parameters)."""
from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from utils import distributed
from utils.forward import to_device
from utils.template import collate


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

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
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


def save_checkpoint(folder: Path, model, params, optimizer, scheduler, stats: "TrainStats", fingerprint=None) -> None:
    """Trainable weights (``trainable.safetensors``), optimizer tensors and RNG states
    (``optimizer.safetensors``), optimizer hyper-parameters, scheduler, progress and the run's
    fingerprint (``state.json``): safetensors and JSON only, nothing pickled. Written to a
    temporary folder and moved into place, so a crash mid-save keeps the previous checkpoint."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder / f".{CKPT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in _named(model, params).items()}, tmp / "trainable.safetensors")
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


def load_checkpoint(folder: Path, model, params, optimizer, scheduler, stats: "TrainStats") -> bool:
    """Restore a checkpoint written by ``save_checkpoint``; False if there is none."""
    from safetensors.torch import load_file

    path = checkpoint_path(Path(folder))
    if path is None:
        return False
    weights = load_file(path / "trainable.safetensors")
    with torch.no_grad():
        for n, p in _named(model, params).items():
            p.copy_(weights[n].to(p.device, p.dtype))
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


def train(model, params, loss_fn, features, cfg: TrainConfig, device, pad_id, desc="train") -> TrainStats:
    """Minimise ``loss_fn(model, batch) -> (loss, {term: float})`` over ``features``.
    A fractional ``num_epochs`` trains on that share of the last epoch's batches. With
    ``cfg.checkpoint_dir`` and ``cfg.save_every`` it saves a resumable checkpoint every
    ``save_every`` steps; with ``cfg.resume`` it continues from it, exactly (same batches,
    optimizer, schedule and dropout RNG).

    Under a launcher with several processes (``utils.distributed``) each rank takes its share
    of every global batch of ``cfg.batch_size`` examples and the gradients are averaged over
    the ranks before the step; only rank 0 saves checkpoints and shows progress."""
    params = [p for p in params if p.requires_grad]
    world = distributed.world_size()
    main_rank = distributed.is_main()
    distributed.broadcast_parameters(params)
    stats = TrainStats(trainable_params=sum(p.numel() for p in params), processes=world)
    per_epoch = math.ceil(len(features) / cfg.batch_size)
    total = max(1, math.ceil(per_epoch * cfg.num_epochs))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if cfg.resume and ckpt_dir is not None and load_checkpoint(ckpt_dir, model, params, optimizer, scheduler, stats):
        stats.processes = world
        if main_rank:
            print(f"{desc}: resumed from {ckpt_dir} at step {stats.steps}/{total}")
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    bar = tqdm(total=total, initial=stats.steps, desc=desc, unit="step", disable=not main_rank)
    t_all = time.perf_counter()
    epoch, skip = divmod(stats.steps, per_epoch)
    lengths = [len(f["input_ids"]) for f in features] if cfg.group_by_length else None
    strata = [bool(f.get("is_forget", False)) for f in features] if cfg.stratify_batches else None
    while stats.steps < total:
        t0 = time.perf_counter()
        for idx in epoch_batches(len(features), cfg.batch_size, cfg.seed, epoch, lengths, cfg.group_by_length, strata)[skip:]:
            if stats.steps >= total:
                break
            if world == 1:
                batch = to_device(collate([features[i] for i in idx], pad_id), device)
                loss, terms = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    bar.close()
                    raise TrainingDiverged(f"non-finite loss ({loss.item()}) at step {stats.steps + 1}")
                loss.backward()
                tokens = int(batch["num_tokens"].sum())
            else:
                loss, terms, tokens = _shard_step(model, loss_fn, features, idx, params, device, pad_id)
                if not math.isfinite(loss):  # the global loss: every rank stops together
                    bar.close()
                    raise TrainingDiverged(f"non-finite loss ({loss}) at step {stats.steps + 1}")
                loss = torch.tensor(loss)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            stats.steps += 1
            stats.train_tokens += tokens
            if stats.steps % cfg.log_every == 0 or stats.steps == total:
                stats.losses.append((stats.steps, loss.item(), terms))
            bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch + 1)
            bar.update(1)
            if ckpt_dir is not None and cfg.save_every and stats.steps % cfg.save_every == 0 and stats.steps < total and main_rank:
                save_checkpoint(ckpt_dir, model, params, optimizer, scheduler, stats, cfg.fingerprint)
        stats.epoch_seconds.append(time.perf_counter() - t0)
        epoch, skip = epoch + 1, 0
    bar.close()
    elapsed = time.perf_counter() - t_all
    stats.tokens_per_second = stats.train_tokens / max(elapsed, 1e-9)
    stats.peak_memory_mb = peak_memory_mb(device)
    model.eval()
    return stats


def _shard_step(model, loss_fn, features, idx, params, device, pad_id):
    """Forward and backward of this rank's share of the global batch ``idx``, then gradient
    averaging over the ranks. Returns (global mean loss, example-weighted mean terms, tokens)."""
    mine = distributed.shard(idx)
    local_loss, terms, tokens = 0.0, {}, 0
    if mine:
        batch = to_device(collate([features[i] for i in mine], pad_id), device)
        loss, terms = loss_fn(model, batch)
        local_loss = loss.item()
        if math.isfinite(local_loss):
            loss.backward()
        tokens = int(batch["num_tokens"].sum())
    n, total = len(mine), len(idx)
    global_loss = distributed.sum_scalar(local_loss * n if n else 0.0) / total
    if math.isfinite(global_loss):
        distributed.sync_gradients(params, n, total)
    merged: dict[str, float] = {}
    for part_n, part in distributed.gather_objects((n, terms)):
        for k, v in part.items():
            merged[k] = merged.get(k, 0.0) + float(v) * part_n / total
    return global_loss, merged, int(distributed.sum_scalar(tokens))
