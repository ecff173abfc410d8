"""One small training loop shared by qlora.py, spul.py and baselines.py: AdamW, cosine
schedule with linear warmup, gradient clipping, seeded shuffling, a progress bar, and an
efficiency record (wall time per epoch, tokens/s, peak memory, trainable parameters)."""
from __future__ import annotations

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


@dataclass
class TrainStats:
    trainable_params: int = 0
    steps: int = 0
    epoch_seconds: list = field(default_factory=list)
    train_tokens: int = 0
    tokens_per_second: float = 0.0
    peak_memory_mb: float = 0.0
    losses: list = field(default_factory=list)  # (step, loss, {term: value})

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["seconds_per_epoch"] = sum(self.epoch_seconds) / max(len(self.epoch_seconds), 1)
        return d


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A seeded shuffle per epoch; forget and retain samples mix in the same batches."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i : i + batch_size].tolist() for i in range(0, n, batch_size)]


CKPT = "last"


def _named(model, params) -> dict[str, torch.Tensor]:
    ids = {id(p) for p in params}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def save_checkpoint(folder: Path, model, params, optimizer, scheduler, stats: "TrainStats") -> None:
    """Trainable weights (safetensors) + optimizer, scheduler, RNG and progress (torch.save of
    tensors and plain containers, read back with weights_only=True); written atomically."""
    from safetensors.torch import save_file

    tmp = folder / f".{CKPT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in _named(model, params).items()}, tmp / "trainable.safetensors")
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "stats": dict(stats.__dict__),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(folder / CKPT, ignore_errors=True)
    os.replace(tmp, folder / CKPT)


def load_checkpoint(folder: Path, model, params, optimizer, scheduler, stats: "TrainStats") -> bool:
    """Restore a checkpoint written by ``save_checkpoint``; False if there is none."""
    from safetensors.torch import load_file

    path = folder / CKPT
    if not (path / "state.pt").is_file():
        return False
    weights = load_file(path / "trainable.safetensors")
    with torch.no_grad():
        for n, p in _named(model, params).items():
            p.copy_(weights[n].to(p.device, p.dtype))
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stats.__dict__.update(state["stats"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return True


def train(model, params, loss_fn, features, cfg: TrainConfig, device, pad_id, desc="train") -> TrainStats:
    """Minimise ``loss_fn(model, batch) -> (loss, {term: float})`` over ``features``.
    A fractional ``num_epochs`` trains on that share of the last epoch's batches. With
    ``cfg.checkpoint_dir`` and ``cfg.save_every`` it saves a resumable checkpoint every
    ``save_every`` steps; with ``cfg.resume`` it continues from it, exactly (same batches,
    optimizer, schedule and dropout RNG)."""
    params = [p for p in params if p.requires_grad]
    stats = TrainStats(trainable_params=sum(p.numel() for p in params))
    per_epoch = math.ceil(len(features) / cfg.batch_size)
    total = max(1, math.ceil(per_epoch * cfg.num_epochs))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if cfg.resume and ckpt_dir is not None and load_checkpoint(ckpt_dir, model, params, optimizer, scheduler, stats):
        print(f"{desc}: resumed from {ckpt_dir / CKPT} at step {stats.steps}/{total}")
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    bar = tqdm(total=total, initial=stats.steps, desc=desc, unit="step")
    t_all = time.perf_counter()
    epoch, skip = divmod(stats.steps, per_epoch)
    while stats.steps < total:
        t0 = time.perf_counter()
        for idx in epoch_batches(len(features), cfg.batch_size, cfg.seed, epoch)[skip:]:
            if stats.steps >= total:
                break
            batch = to_device(collate([features[i] for i in idx], pad_id), device)
            loss, terms = loss_fn(model, batch)
            if not torch.isfinite(loss):
                bar.close()
                raise TrainingDiverged(f"non-finite loss ({loss.item()}) at step {stats.steps + 1}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            stats.steps += 1
            stats.train_tokens += int(batch["num_tokens"].sum())
            if stats.steps % cfg.log_every == 0 or stats.steps == total:
                stats.losses.append((stats.steps, loss.item(), terms))
            bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch + 1)
            bar.update(1)
            if ckpt_dir is not None and cfg.save_every and stats.steps % cfg.save_every == 0 and stats.steps < total:
                save_checkpoint(ckpt_dir, model, params, optimizer, scheduler, stats)
        stats.epoch_seconds.append(time.perf_counter() - t0)
        epoch, skip = epoch + 1, 0
    bar.close()
    elapsed = time.perf_counter() - t_all
    stats.tokens_per_second = stats.train_tokens / max(elapsed, 1e-9)
    stats.peak_memory_mb = peak_memory_mb(device)
    model.eval()
    return stats
