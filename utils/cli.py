"""Argument groups shared by the entry points, input checks, and the one-line error exit."""
from __future__ import annotations

import argparse
import sys
from functools import wraps

from utils.data import DATASETS, DEFAULT_DATASET, SPLITS, DataError
from utils.runs import RunError


class UsageError(ValueError):
    """A bad flag value; the message names the flag."""


def parser(description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    names = "; ".join(f"{k}: {v.description}" for k, v in DATASETS.items())
    g.add_argument("--dataset", default=DEFAULT_DATASET, help=f"dataset name ({names})")
    g.add_argument("--data_dir", default=None, help="folder holding the four splits (train_retain, train_forget, test_retain, test_forget) as csv/jsonl/json/parquet; overrides --dataset's location")
    g.add_argument("--data_root", default=None, help="root searched for <root>/<dataset's folder> before the hub (env SPUL_DATA_ROOT)")
    g.add_argument("--forget_size", type=float, default=1.0, help="share tau in (0, 1] of train_forget kept (seeded); the other splits stay whole")
    g.add_argument("--max_per_split", type=int, default=None, help="cap every split at this many examples (seeded, class-stratified)")
    for s in SPLITS:
        g.add_argument(f"--max_{s}", type=int, default=None, help=f"cap {s} (overrides --max_per_split)")
    g.add_argument("--max_length", type=int, default=1024, help="max tokens per example; the review text is truncated, never the template or the label")
    g.add_argument("--seed", type=int, default=42, help="seed for data subsampling, generic labels, shuffling and initialisation")


def add_model_args(p: argparse.ArgumentParser) -> None:
    from utils.models import DEFAULT_MODEL

    g = p.add_argument_group("model")
    g.add_argument("--model_name", default=DEFAULT_MODEL, help=f"hub id (meta-llama/Llama-2-7b-hf, facebook/opt-1.3b, ...), a local model folder, or the embedded alias {DEFAULT_MODEL}")
    g.add_argument("--set_pad_id", action="store_true", help="use the EOS token as the padding token (models without a pad token get this anyway)")


def add_train_args(p, lr, epochs, batch=32, warmup=0.05, weight_decay=0.001, max_grad_norm=0.3) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW)")
    g.add_argument("--num_epochs", type=float, default=epochs, help="training epochs (a fraction trains on part of the last epoch)")
    g.add_argument("--train_batch_size", type=int, default=batch, help="examples per optimiser step")
    g.add_argument("--eval_batch_size", type=int, default=batch, help="examples per evaluation forward")
    g.add_argument("--weight_decay", type=float, default=weight_decay, help="AdamW weight decay")
    g.add_argument("--warmup_ratio", type=float, default=warmup, help="share of steps with linear warmup before the cosine decay")
    g.add_argument("--max_grad_norm", type=float, default=max_grad_norm, help="gradient clipping norm")


def add_output_args(p) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output_path", default=None, help="run folder to write (default: runs/<model>-<dataset>-<kind>)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run folder")


def check_common(args) -> None:
    """Checks that need no model or data: numeric ranges of shared flags."""
    if not 0 < args.forget_size <= 1:
        raise UsageError(f"--forget_size {args.forget_size}: must be in (0, 1]")
    for name in ["max_per_split"] + [f"max_{s}" for s in SPLITS]:
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise UsageError(f"--{name} {v}: must be at least 1")
    positive = ("lr", "num_epochs", "train_batch_size", "eval_batch_size", "max_length")
    for name in positive:
        if hasattr(args, name) and getattr(args, name) <= 0:
            raise UsageError(f"--{name} {getattr(args, name)}: must be positive")
    if getattr(args, "dataset", None) not in DATASETS and not getattr(args, "data_dir", None):
        raise UsageError(f"--dataset {args.dataset}: unknown dataset (choose from {', '.join(DATASETS)}, or pass --data_dir)")


def user_errors() -> tuple[type, ...]:
    from utils.models import ModelNotFound
    from utils.splits import SplitError

    return (UsageError, DataError, RunError, ModelNotFound, SplitError)


def entry_point(main):
    """Run ``main``; a user error prints one line on stderr and exits with status 2."""

    @wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except user_errors() as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def check_max_length(encoder, words) -> None:
    """``--max_length`` must hold the template, one text token and the longest label."""
    need = encoder.min_length(words)
    if encoder.max_length < need:
        raise UsageError(f"--max_length {encoder.max_length}: too short to hold the template and the label (need at least {need})")
