"""Argument groups shared by the entry points, input checks, and the one-line error exit."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
from functools import wraps
from pathlib import Path

import torch

from utils import distributed
from utils.data import DATASETS, DEFAULT_DATASET, EVAL_SPLITS, VAL_SPLITS, DataConfig, DataError, resolve_task, split_fingerprint
from utils.models import DEFAULT_MODEL, ModelNotFound, load_tokenizer, resolve_model, short_reason
from utils.runs import TOKENIZER_DIR, RunError, read_manifest
from utils.splits import SplitError
from utils.task import TASKS
from utils.template import Encoder, check_labels
from utils.trackers import DEFAULT_PROJECT, TrackerError, check_package, check_tracker_dir, default_tracker_dir, hparams
from utils.training import LaunchError, read_checkpoint_info


class UsageError(ValueError):
    """A bad flag value; the message names the flag."""


class Parser(argparse.ArgumentParser):
    """argparse with the toolkit's error format: one line on stderr, exit status 2."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parser(description: str) -> argparse.ArgumentParser:
    return Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    names = "; ".join(f"{k}: {v.description}" for k, v in DATASETS.items())
    g.add_argument("--dataset", default=DEFAULT_DATASET, help=f"dataset name ({names})")
    g.add_argument("--data_dir", default=None, help="folder holding the four splits (train_retain, train_forget, test_retain, test_forget) as csv/jsonl/json/parquet; overrides --dataset's location")
    g.add_argument("--task", default=None, choices=tuple(TASKS), help="the task the splits are read as (utils/task.py); default: --dataset's (sentiment for a --data_dir of another name)")
    g.add_argument("--data_root", default=None, help="root searched for <root>/<dataset's folder> before the hub (env SPUL_DATA_ROOT)")
    g.add_argument("--forget_size", type=float, default=1.0, help="share tau in (0, 1] of train_forget kept (seeded); the other splits stay whole")
    g.add_argument("--val_fraction", type=float, default=0.05, help="share of train_retain and of train_forget moved into val_retain and val_forget (seeded by --data_seed, class-stratified) before --forget_size and the caps; no stage trains on them; --max_val_retain/--max_val_forget give the sizes instead; 0 with no such cap: no validation splits")
    g.add_argument("--max_per_split", type=int, default=None, help="cap every split at this many examples (seeded by --data_seed, class-stratified)")
    for s in EVAL_SPLITS:
        what = "the number of rows carved out of train_" + s.split("_")[1] if s in VAL_SPLITS else f"cap {s}"
        g.add_argument(f"--max_{s}", type=int, default=None, help=f"{what} (overrides --max_per_split)")
    g.add_argument("--eval_splits", nargs="+", default=list(EVAL_SPLITS), choices=EVAL_SPLITS, metavar="SPLIT",
                   help=f"splits to evaluate, of {', '.join(EVAL_SPLITS)}; test splits left out are dropped as soon as they are loaded (model selection never reads them)")
    g.add_argument("--max_length", type=int, default=1024, help="max tokens per example; the review text is truncated, never the template or the label")
    r = p.add_argument_group("reproducibility")
    r.add_argument("--seed", type=int, default=42, help="seed for training: initialisation, shuffling, generic labels, dropout")
    r.add_argument("--data_seed", type=int, default=0, help="seed for the data: validation carve, --forget_size and the caps (fixed across a --seed sweep, so seeds vary training only)")
    r.add_argument("--threads", type=int, default=None, help="CPU threads for torch (torch.set_num_threads), recorded in config.json and the manifest; MKL runs in its strict reproducibility mode (recorded in the manifest as blas) and the few ops found to depend on the count run on one thread (utils/invariant.py), so a spul.py run gives the same bits at 1 and 2 threads; default: $OMP_NUM_THREADS, else torch's default")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model_name", default=DEFAULT_MODEL, help=f"hub id (meta-llama/Llama-2-7b-hf, facebook/opt-1.3b, ...), a local model folder, or the embedded alias {DEFAULT_MODEL}")
    g.add_argument("--set_pad_id", action="store_true", help="use the EOS token as the padding token (models without a pad token get this anyway)")


def add_train_args(p, lr, epochs, batch=32, warmup=0.05, weight_decay=0.001, max_grad_norm=0.3, save_every=0) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW)")
    g.add_argument("--num_epochs", type=float, default=epochs, help="training epochs (a fraction trains on part of the last epoch)")
    g.add_argument("--train_batch_size", type=int, default=batch,
                   help="examples per forward, summed over all processes (per optimiser step: this times "
                        "--gradient_accumulation_steps)")
    g.add_argument("--eval_batch_size", type=int, default=batch, help="examples per evaluation forward")
    g.add_argument("--weight_decay", type=float, default=weight_decay, help="AdamW weight decay")
    g.add_argument("--warmup_ratio", type=float, default=warmup, help="share of steps with linear warmup before the cosine decay")
    g.add_argument("--max_grad_norm", type=float, default=max_grad_norm, help="gradient clipping norm")
    g.add_argument("--group_by_length", type=int, default=0, metavar="N",
                   help="length-grouped batches: each epoch's shuffled order is cut into runs of N batches, each "
                        "sorted by length before it is cut into batches (less padding, so less compute); 0: plain "
                        "shuffled batches")
    g.add_argument("--stratify_batches", action="store_true",
                   help="every batch holds the same share of forget samples (within two samples, nearly always one) instead of a share that varies "
                        "from batch to batch; the loss terms are means over their own samples, so this evens out the "
                        "weight each forget sample gets from step to step")
    g.add_argument("--ema_decay", type=float, default=0.0, metavar="D",
                   help="keep an exponential moving average of the trainable weights (decay D per optimiser step, "
                        "warmed up as min(D, (1+t)/(10+t)) at step t) and save and evaluate the average instead of "
                        "the last step's weights (ours: smooths the end of a noisy trajectory); 0: off, the last "
                        "weights (the paper)")
    g.add_argument("--save_every", type=int, default=save_every,
                   help="save a resumable checkpoint (trainable weights, optimizer, scheduler, RNG, progress) every N "
                        "optimiser steps into the hidden folder .<output name>.ckpt next to the run folder, removed "
                        "once the run folder is complete; 0: no checkpoints")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last checkpoint (same command and flags; "
                        "starts from step 0 when there is none)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, metavar="K",
                   help="micro-batches of --train_batch_size per optimiser step: a step averages over "
                        "train_batch_size * K examples, exactly as one batch of that size would (the loss terms are "
                        "normalised by the step's counts)")
    g.add_argument("--mixed_precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                   help="autocast precision of the training forward (accelerate): auto is bf16 on a CUDA GPU that "
                        "supports it, fp16 on older GPUs, no (fp32) on CPU; overrides accelerate launch's own setting")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="activation checkpointing during training (CUDA only; ignored with a warning on CPU): less "
                        "memory for one more forward; SPUL then prepends the prompt instead of using its KV cache")
    t = p.add_argument_group("experiment tracking (utils/trackers.py)")
    t.add_argument("--report_to", default="none", choices=["none", "tensorboard", "wandb"],
                   help="log the loss, each loss term and the learning rate of every logged step, and the evaluation "
                        "metrics of each split after training, through accelerate's tracker: tensorboard (open with "
                        "tensorboard --logdir TRACKER_DIR) or wandb (offline unless WANDB_MODE is set: no account "
                        "needed; upload later with wandb sync TRACKER_DIR/wandb/offline-run-*); none: no tracker files")
    t.add_argument("--tracker_dir", default=None,
                   help="folder the tracker writes to while the run trains (the run folder itself is written only at "
                        "the end); default: <output_path>.trackers next to the run folder, kept after the run")
    t.add_argument("--tracker_project", default="spul", help="wandb project name")
    t.add_argument("--run_name", default=None,
                   help="tracker run name (tensorboard: TRACKER_DIR/RUN_NAME/; wandb: the run's name); default: "
                        "<output folder name>-<YYYYmmdd-HHMMSS>")


def add_forget_target_args(g, learner: str) -> None:
    """The flags that shape what the forget and retain samples train toward, shared by spul.py and
    baselines.py (``learner``: what learns, for the help): --generic_label, --counterfactual_retain,
    --pseudo_retain."""
    g.add_argument("--generic_label", default=None, metavar="WORD",
                   help="the generic label every forget sample is trained toward, one of the task's (sentiment: neutral, "
                        "unknown); default: one drawn uniformly per forget sample from --seed (the paper). One label gives "
                        "the forget loss a target it can reach (ours; 'unknown' is the label the --hard_prefix instruction "
                        "and the instruction_prompt baseline ask for)")
    g.add_argument("--counterfactual_retain", type=float, nargs="?", const=1.0, default=0.0, metavar="SHARE",
                   help="entity forget sets: add a retain sample for a seeded share (default when given: 1, all) of the "
                        "forget texts, the text with its forgotten names swapped for made-up names and its true label, so "
                        f"that {learner} learns to forget these names rather than any name (utils/augment.py); 0 (default): off")
    g.add_argument("--pseudo_retain", type=int, default=0, metavar="N",
                   help="add N retain texts from the part of the training pool that no split uses (the rows the "
                        "--max_train_retain cap leaves out; never a validation or test row), each labelled with the starting "
                        f"model's own answer before {learner} is trained, to the retain side of the loss (its CE and KL), so that "
                        f"{learner} is also held to the model's behaviour on reviews outside the training set (ours, "
                        "utils/augment.py); 0 (default): off")


def check_forget_targets(args, task) -> None:
    """The checks of :func:`add_forget_target_args`' flags (``task``: the data's, for the label)."""
    if args.pseudo_retain < 0:
        raise UsageError(f"--pseudo_retain {args.pseudo_retain}: must be >= 0")
    if not 0 <= args.counterfactual_retain <= 1:
        raise UsageError(f"--counterfactual_retain {args.counterfactual_retain}: the share of forget texts must be in [0, 1]")
    if args.generic_label is not None and args.generic_label not in task.generic_labels:
        raise UsageError(f"--generic_label {args.generic_label}: not a generic label of task {task.name} "
                         f"(choose from {', '.join(task.generic_labels)})")


def add_output_args(p) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output_path", default=None, help="run folder to write (default: runs/<model>-<dataset>-<kind>)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run folder")


def check_common(args) -> None:
    """Checks that need no model or data: numeric ranges of shared flags, the launcher."""
    check_launcher()
    if not 0 < args.forget_size <= 1:
        raise UsageError(f"--forget_size {args.forget_size}: must be in (0, 1]")
    for name in ["max_per_split"] + [f"max_{s}" for s in EVAL_SPLITS]:
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise UsageError(f"--{name} {v}: must be at least 1")
    if not 0 <= getattr(args, "val_fraction", 0.0) < 1:
        raise UsageError(f"--val_fraction {args.val_fraction}: must be in [0, 1)")
    if hasattr(args, "eval_splits"):
        args.eval_splits = [s for s in EVAL_SPLITS if s in args.eval_splits]  # canonical order
    set_threads(args)
    if getattr(args, "save_every", 0) < 0:
        raise UsageError(f"--save_every {args.save_every}: must be >= 0 (0: no checkpoints)")
    if not 0 <= getattr(args, "ema_decay", 0.0) < 1:
        raise UsageError(f"--ema_decay {args.ema_decay}: must be in [0, 1) (0: off)")
    if getattr(args, "gradient_accumulation_steps", 1) < 1:
        raise UsageError(f"--gradient_accumulation_steps {args.gradient_accumulation_steps}: must be at least 1")
    if getattr(args, "report_to", "none") != "none":
        check_package(args.report_to)  # one line naming the flag and the pip command
    if getattr(args, "group_by_length", 0) < 0:
        raise UsageError(f"--group_by_length {args.group_by_length}: must be >= 0 (0: plain shuffled batches)")
    positive = ("lr", "num_epochs", "train_batch_size", "eval_batch_size", "max_length")
    for name in positive:
        if hasattr(args, name) and getattr(args, name) <= 0:
            raise UsageError(f"--{name} {getattr(args, name)}: must be positive")
    if getattr(args, "dataset", None) not in DATASETS and not getattr(args, "data_dir", None):
        raise UsageError(f"--dataset {args.dataset}: unknown dataset (choose from {', '.join(DATASETS)}, or pass --data_dir)")


def set_threads(args) -> None:
    """Resolve ``--threads`` (default: $OMP_NUM_THREADS, else torch's own default), apply it,
    and write the resolved value back into ``args`` so that config.json records it."""
    if getattr(args, "threads", None) is None:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        args.threads = int(env) if env.isdigit() and int(env) > 0 else torch.get_num_threads()
    if args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be at least 1")
    if torch.get_num_threads() != args.threads:
        torch.set_num_threads(args.threads)


def check_launcher() -> None:
    """``accelerate launch`` configs for DDP, FSDP and DeepSpeed are all accepted: the training
    loop runs on accelerate (``utils.training``). Only Megatron-LM, which needs a model written
    for it, is refused."""
    if os.environ.get("ACCELERATE_USE_MEGATRON_LM", "").strip().lower() in ("1", "true", "yes"):
        raise UsageError("accelerate launch: Megatron-LM is not supported (ACCELERATE_USE_MEGATRON_LM is set); "
                         "use a DDP, FSDP or DeepSpeed config")


def user_errors() -> tuple[type, ...]:
    return (UsageError, DataError, RunError, ModelNotFound, SplitError, TrackerError, LaunchError)


def entry_point(main):
    """Run ``main``; a user error prints one line on stderr and exits with status 2. SIGTERM
    (a scheduler's or launcher's stop) becomes ``SystemExit(143)`` while it runs, so that, as with
    Ctrl-C, temporary run folders are removed on the way out (``utils.runs.atomic_run_dir``)."""

    @wraps(main)
    def wrapper(argv=None):
        installed, previous = _exit_on_sigterm()
        try:
            return main(argv)
        except user_errors() as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        finally:
            if installed:
            
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    return wrapper


def _exit_on_sigterm():
    """Install the SIGTERM handler (main thread only); returns (installed, previous handler)."""

    if threading.current_thread() is not threading.main_thread():
        return False, None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    return True, signal.signal(signal.SIGTERM, stop)


def check_max_length(encoder, words) -> None:
    """``--max_length`` must hold the template, one text token and the longest label; and,
    before any training, the label words must be told apart by their first in-context token
    (``utils.template.check_labels``). Either problem is a one-line ``UsageError``."""

    try:
        check_labels(encoder, words)
        need = encoder.min_length(words)
    except UsageError:
        raise
    except ValueError as e:  # the tokenizer cannot serve these labels: one line, not a traceback
        raise UsageError(str(e)) from e
    if encoder.max_length < need:
        raise UsageError(f"--max_length {encoder.max_length}: too short to hold the template and the label (need at least {need})")


def check_tokenizer(args) -> None:
    """``--max_length`` against the tokenizer the run will use, loaded without the model: the
    run folder's ``tokenizer/`` with ``--model_checkpoints``, else ``--model_name``'s (which also
    checks that the model name resolves)."""
    task = resolve_task(args.dataset, getattr(args, "task", None))
    if getattr(args, "model_checkpoints", None):
        manifest = read_manifest(Path(args.model_checkpoints), "--model_checkpoints")  # a run folder at all
        trained_on = manifest.get("task", "sentiment")  # runs made before tasks existed are sentiment runs
        if trained_on != task.name:
            raise UsageError(f"--model_checkpoints {args.model_checkpoints}: a run of the {trained_on} task; "
                             f"--dataset {args.dataset} is read as the {task.name} task (pass --task {trained_on} or other data)")
        flag, path = "--model_checkpoints", Path(args.model_checkpoints) / TOKENIZER_DIR
        if not path.is_dir():
            raise RunError(f"--model_checkpoints {args.model_checkpoints}: has no tokenizer/ folder (an incomplete run?)")
    else:
        flag, path = "--model_name", resolve_model(args.model_name)
    try:
        tokenizer = load_tokenizer(path, getattr(args, "set_pad_id", False))
    except (OSError, ValueError) as e:
        raise RunError(f"{flag} {path}: cannot load its tokenizer ({short_reason(e)})") from e
    check_max_length(Encoder(tokenizer, args.max_length, task=task), task.all_words)


def data_config(args) -> DataConfig:
    """The data flags as the library takes them (``utils.data.prepare_splits``)."""
    caps = {s: getattr(args, f"max_{s}", None) or getattr(args, "max_per_split", None) for s in EVAL_SPLITS}
    return DataConfig(dataset=args.dataset, task=resolve_task(args.dataset, getattr(args, "task", None)),
                      data_dir=args.data_dir, data_root=getattr(args, "data_root", None), forget_size=args.forget_size,
                      val_fraction=getattr(args, "val_fraction", 0.0), caps=caps, data_seed=args.data_seed,
                      eval_splits=tuple(getattr(args, "eval_splits", None) or EVAL_SPLITS))


# ---------------------------------------------------------------------------------------------
# Resumable checkpoints (--save_every, --resume)
# ---------------------------------------------------------------------------------------------

UNBOUND = ("resume", "save_every", "overwrite", "output_path",  # flags a resumed run may change
           "report_to", "tracker_dir", "tracker_project", "run_name")


def checkpoint_dir(out) -> Path:
    """The hidden sibling of the run folder that holds its checkpoints while it trains."""
    out = Path(out)
    return out.parent / f".{out.name}.ckpt"


def run_fingerprint(args, splits) -> dict:
    """What a checkpoint is bound to: every flag that can change training, and the data."""
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in UNBOUND}
    data = {s: f["sha256"] for s, f in split_fingerprint(splits).items()}
    return json.loads(json.dumps({"flags": flags, "splits": data}, default=str))


def check_resume(args, out, splits) -> dict:
    """Before any model is loaded: with ``--resume``, the checkpoint next to ``out`` must come
    from the same flags and data. Returns the ``TrainConfig`` fields for checkpointing, batching,
    accumulation, precision and experiment tracking (``tracker_fields``: the
    tracker folder is checked to be writable here)."""
    folder = checkpoint_dir(out)
    fingerprint = run_fingerprint(args, splits)
    found = read_checkpoint_info(folder)
    say = distributed.is_main()
    if args.resume and found is None and say:
        print(f"warning: --resume: no checkpoint in {folder}; starting from step 0", file=sys.stderr)
    if args.resume and found is not None:
        old = found["fingerprint"] or {}
        if old != fingerprint:
            differ = _differences(old, fingerprint)
            raise UsageError(
                f"--resume: the checkpoint in {folder} was written by a run with other settings ({differ}); "
                f"rerun with the same flags and data, or drop --resume to start over"
            )
    if not args.resume and found is not None and say:
        print(f"warning: {folder} holds a checkpoint of an interrupted run (step {found['steps']}); "
              f"starting over (pass --resume to continue it)", file=sys.stderr)
    return {"checkpoint_dir": str(folder), "save_every": args.save_every, "resume": args.resume, "fingerprint": fingerprint,
            "group_by_length": getattr(args, "group_by_length", 0), "stratify_batches": getattr(args, "stratify_batches", False),
            "gradient_accumulation_steps": getattr(args, "gradient_accumulation_steps", 1),
            "ema_decay": getattr(args, "ema_decay", 0.0),
            "mixed_precision": getattr(args, "mixed_precision", "no"),
            "gradient_checkpointing": getattr(args, "gradient_checkpointing", False),
            **tracker_fields(args, out)}


def tracker_fields(args, out) -> dict:
    """The ``TrainConfig`` fields for the trackers, checked (package, writable folder); the
    resolved folder and run name are written back into ``args`` so that config.json records
    where the logs are. Nothing is created with ``--report_to none``."""
    report_to = getattr(args, "report_to", "none") or "none"
    if report_to == "none":
        return {"report_to": "none"}
    check_package(report_to)
    folder = Path(args.tracker_dir) if getattr(args, "tracker_dir", None) else default_tracker_dir(out)
    check_tracker_dir(folder)
    name = getattr(args, "run_name", None) or f"{Path(out).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    args.tracker_dir, args.run_name = str(folder), name
    config = {k: v for k, v in sorted(vars(args).items())}
    return {"report_to": report_to, "tracker_dir": str(folder), "run_name": name,
            "tracker_project": getattr(args, "tracker_project", None) or DEFAULT_PROJECT,
            "tracker_config": hparams(config)}


def _differences(old: dict, new: dict, limit: int = 4) -> str:
    out = []
    for key in ("flags", "splits"):
        a, b = old.get(key) or {}, new.get(key) or {}
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                out.append(f"{k}: {a.get(k, '-')} -> {b.get(k, '-')}" if key == "flags" else f"data split {k}")
    more = f", and {len(out) - limit} more" if len(out) > limit else ""
    return ", ".join(out[:limit]) + more


def remove_checkpoints(out) -> None:
    """Once the run folder is complete its checkpoints are no longer needed."""
    shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
