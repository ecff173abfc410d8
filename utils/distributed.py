"""Several processes (``accelerate launch`` / ``torchrun``) on top of accelerate's
``PartialState``, with a no-op single-process path.

A launcher sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
accelerate joins the process group on first use (``nccl`` on CUDA, ``gloo`` on CPU). Without
those variables (or with ``WORLD_SIZE=1``) every function here is a no-op and nothing in the
single-process path changes.

- Training (``utils.training.train``) runs on accelerate's ``Accelerator`` (DDP, FSDP or
  DeepSpeed as the launcher's config says); it uses ``shard`` to deal each micro-batch out.
- Evaluation (``utils.evaluation.predict``): the length-sorted batches of the single-process
  evaluation are dealt out round-robin (``shard``), so every example is computed in the same
  batch as in a single process; each rank's (index, prediction) pairs are gathered
  (``gather_objects``), checked to cover every index exactly once (no sampler padding, no
  duplicates) and put back in order (``merge_by_index``).
- Only the main process writes run folders and checkpoints; the others wait for it (``barrier``).
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch

PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)  # rank 0 may evaluate or write for a long time


def launched_world_size() -> int:
    """The number of processes a launcher started (1 without one)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def state():
    """accelerate's ``PartialState`` (joins the process group on first call). ``cpu`` when
    there is no GPU, so that several CPU processes run data-parallel over gloo."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=PROCESS_GROUP_TIMEOUT)


def enabled() -> bool:
    """True when this process is one of several."""
    return launched_world_size() > 1 and state().num_processes > 1


def _shutdown() -> None:
    """Leave the process group (for tests that start ranks themselves)."""
    if launched_world_size() > 1:
        from accelerate import PartialState

        PartialState().destroy_process_group()
        PartialState._reset_state()


def rank() -> int:
    return state().process_index if enabled() else 0


def world_size() -> int:
    return state().num_processes if enabled() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if enabled():
        state().wait_for_everyone()


def distributed_type() -> str:
    """accelerate's distributed type of this launch ("NO", "MULTI_GPU", "MULTI_CPU", "FSDP",
    "DEEPSPEED", ...); "NO" without a launcher. FSDP and DeepSpeed are read from the variables
    ``accelerate launch`` sets for such a config."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes"):
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes"):
        return "DEEPSPEED"
    if launched_world_size() <= 1:
        return "NO"
    return str(state().distributed_type).split(".")[-1]


def sharded() -> bool:
    """True when the model is sharded over the processes (FSDP or DeepSpeed)."""
    return distributed_type() in ("FSDP", "DEEPSPEED")


def shard(items: list) -> list:
    """This rank's share of ``items``: every ``world``-th one, starting at ``rank``."""
    return items[rank() :: world_size()] if enabled() else items


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
    if not enabled():
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def sum_scalar(value: float) -> float:
    """The sum of ``value`` over the ranks (as float64)."""
    return float(sum(gather_objects(float(value)))) if enabled() else value


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
