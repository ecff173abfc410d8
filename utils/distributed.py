"""Several processes (``accelerate launch`` / ``torchrun``): data-parallel training and
evaluation over ``torch.distributed``, with a no-op single-process path.

A launcher sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
the process group is joined on first use (``nccl`` on CUDA, ``gloo`` on CPU). Without those
variables (or with ``WORLD_SIZE=1``) every function here is a no-op and nothing in the single-
process path changes.

- Training (``utils.training.train``): every rank holds the whole model and takes its share
  ``batch[rank::world]`` of each global batch; after the backward the gradients are summed over
  the ranks, each rank's weighted by its number of examples, and divided by the global batch
  size, so that every rank applies the same update (DDP semantics for a per-example mean loss).
  The trainable parameters are broadcast from rank 0 once before the first step.
- Evaluation (``utils.evaluation.predict``): the length-sorted batches of the single-process
  evaluation are dealt out round-robin, so every example is computed in the same batch as in a
  single process; each rank's (index, prediction) pairs are gathered, checked to cover every
  index exactly once (no sampler padding, no duplicates) and put back in order.
- Only rank 0 writes run folders and checkpoints; the others wait for it (``barrier``).
"""
from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def launched_world_size() -> int:
    """The number of processes a launcher started (1 without one)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def enabled() -> bool:
    """True when this process is one of several; joins the process group on first call."""
    if launched_world_size() <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=60))
        atexit.register(_shutdown)
    return True


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if enabled() else 0


def world_size() -> int:
    return dist.get_world_size() if enabled() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if enabled():
        dist.barrier()


def shard(items: list) -> list:
    """This rank's share of ``items``: every ``world``-th one, starting at ``rank``."""
    return items[rank() :: world_size()] if enabled() else items


def broadcast_parameters(params) -> None:
    """Make every rank start from rank 0's values."""
    if not enabled():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def sync_gradients(params, local_examples: int, global_examples: int) -> None:
    """Replace each gradient by the example-weighted mean over the ranks:
    ``sum_r n_r * g_r / N`` (a rank with no examples contributes zeros)."""
    if not enabled():
        return
    params = list(params)
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=_comm_device())
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)  # a gradient on any rank: sync it
    grads = []
    for p, has in zip(params, has_grad.tolist()):
        if not has:
            continue  # no rank has one: stays None, as in one process
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    scale = local_examples / global_examples
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket]) * scale
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in bucket:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


def _buckets(tensors, max_elements: int = 1 << 24):
    """Group same-dtype/device tensors into buckets of at most ``max_elements`` values."""
    bucket, size, key = [], 0, None
    for t in tensors:
        k = (t.dtype, t.device)
        if bucket and (k != key or size + t.numel() > max_elements):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
        key = k
    if bucket:
        yield bucket


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_scalar(value: float) -> float:
    """The sum of ``value`` over the ranks (as float64)."""
    if not enabled():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
    if not enabled():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def merge_by_index(parts: list[tuple[list[int], list]], n: int) -> list:
    """Per-rank ``(indices, values)`` -> ``values`` in index order, each index exactly once.
    A repeated index (for example from a padded sampler) is dropped; a missing one is an error."""
    out, seen = [None] * n, [False] * n
    for indices, values in parts:
        for i, v in zip(indices, values):
            if not 0 <= i < n:
                raise RuntimeError(f"distributed evaluation returned index {i} outside 0..{n - 1}")
            if not seen[i]:
                out[i], seen[i] = v, True
    missing = [i for i, s in enumerate(seen) if not s]
    if missing:
        raise RuntimeError(f"distributed evaluation lost {len(missing)} of {n} examples (first: {missing[0]})")
    return out
