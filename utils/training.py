"""One small training loop shared by qlora.py, spul.py and baselines.py: AdamW, cosine
schedule with linear warmup, gradient clipping, seeded shuffling, a progress bar, and an
efficiency record (wall time per epoch, tokens/s, peak memory, trainable parameters)."""
from __future__ import annotations

import math
import random
import resource
import time
from dataclasses import dataclass, field

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


def train(model, params, loss_fn, features, cfg: TrainConfig, device, pad_id, desc="train") -> TrainStats:
    """Minimise ``loss_fn(model, batch) -> (loss, {term: float})`` over ``features``.
    A fractional ``num_epochs`` trains on that share of the last epoch's batches."""
    params = [p for p in params if p.requires_grad]
    stats = TrainStats(trainable_params=sum(p.numel() for p in params))
    per_epoch = math.ceil(len(features) / cfg.batch_size)
    total = max(1, math.ceil(per_epoch * cfg.num_epochs))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    bar = tqdm(total=total, desc=desc, unit="step")
    t_all = time.perf_counter()
    epoch = 0
    while stats.steps < total:
        t0 = time.perf_counter()
        for idx in epoch_batches(len(features), cfg.batch_size, cfg.seed, epoch):
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
        stats.epoch_seconds.append(time.perf_counter() - t0)
        epoch += 1
    bar.close()
    elapsed = time.perf_counter() - t_all
    stats.tokens_per_second = stats.train_tokens / max(elapsed, 1e-9)
    stats.peak_memory_mb = peak_memory_mb(device)
    model.eval()
    return stats
