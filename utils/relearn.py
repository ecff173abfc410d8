#!/usr/bin/env python
"""Relearning attack: fine-tune an unlearned model's weights (a fresh LoRA adapter) on the
forget examples of a few forgotten entities, with their true labels, and measure whether the
forgotten behaviour comes back on forget examples of the *other* entities, which the attack
never trained on.

    python -m utils.relearn RUN [RUN ...] [data flags] --output_path DIR

Entities. A forget example belongs to every forgotten name it mentions (``utils.splits.name_pattern``
per name: whole words, case-insensitive). A seeded share (``--attack_share``, at least one) of
the names mentioned in train_forget is chosen. The *attack set* is the train_forget rows that
mention at least one chosen name; the *held-out* sets are the train_forget rows and the
test_forget rows that mention none of them ("held-out train forget", "held-out test forget"),
plus test_retain (utility). ``attack_partition`` computes them.

The control (``--attack_data retain``). The same number of rows, with their true labels, drawn
(seeded) from train_retain among the rows that name none of the forgotten people
(``retain_attack_rows``); the held-out sets are the forget attack's, row for row. It asks
whether *any* fine-tuning of the weights undoes the forgetting, or only fine-tuning on the
forgotten people's texts. ``plan_attack`` is the only place that decides which rows are
trained on.

The attack, per RUN. The run is loaded (``utils.binding.load_checked``), every parameter it has
is frozen, and a fresh LoRA adapter (peft) is put on the attention and MLP linear layers of the
causal LM inside it (``utils.forward.unwrap``: for a SPUL run that is the model under the PEFT
prompt wrapper). The run's prompt (``Loaded.prompt``: a SPUL run's soft prompt, a training-free
baseline's prefix) stays attached and frozen: it is prepended to every training forward and
every evaluation (where ``evaluate_splits`` builds its ``PromptCache`` afresh on each call, so
the cache always reflects the current weights). The loss is the cross-entropy on the label
tokens with the true labels. Training goes through ``utils.training.train`` (AdamW, cosine
schedule with linear warmup over the whole attack, clipping, seeded shuffle per epoch): the
attack set is cycled through in seeded order, with ``num_epochs`` set so that exactly
``max(--steps)`` optimiser steps are taken.

Evaluation at the listed steps. The simplest way that is exact: the loss function handed to
``train`` is wrapped (``StepEvaluator``), and when it is called for step s + 1 -- the weights
are then exactly those after s optimiser steps -- and s is a listed step, it first evaluates the
held-out sets (in eval mode, under inference mode, no RNG drawn, so the training trajectory is
the same as without evaluation). Step 0 is evaluated the same way at the first call, the last
step after ``train`` returns. Training in segments would restart AdamW's moments and the
learning-rate schedule at every segment, so it would not be one attack of max(--steps) steps.
Note that the schedule spans the whole attack: the model at step 10 of a 50-step attack is not
the model of a 10-step attack. Single process only.

Output (atomic, ``utils.runs.atomic_run_dir``): ``relearn.json`` (config, names, row counts,
per run the accuracy at each step on each held-out set and the full metrics), ``relearn.md``
(one row per run and step) and ``relearn.png`` (held-out forget accuracy vs steps).
"""
from __future__ import annotations

import gc
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from utils import cli
from utils.augment import AugmentError, forgotten_names
from utils.binding import check_binding
from utils.kinds import load_checked, read_run_tokenizer
from utils.data import encode_frame, prepare_splits, resolve_task, split_fingerprint
from utils.distributed import launched_world_size
from utils.evaluation import evaluate_splits
from utils.forward import label_logits, unwrap
from utils.losses import ce_per_sample
from utils.models import add_lora, lora_config, lora_target_modules, select_device
from utils.runs import atomic_run_dir, check_output, library_versions, write_json
from utils.splits import clean_names, name_pattern
from utils.template import Encoder
from utils.training import TrainConfig, seed_everything, train

HELDOUT = ("heldout_train_forget", "heldout_test_forget", "test_retain")
ATTACK_DATA = ("forget", "retain")  # --attack_data: the forget rows of the chosen names, or the control
TITLES = {
    "heldout_train_forget": "held-out train forget",
    "heldout_test_forget": "held-out test forget",
    "test_retain": "test retain",
}
JSON, MARKDOWN, PLOT = "relearn.json", "relearn.md", "relearn.png"


# ---------------------------------------------------------------------------------------------
# Entities: which rows the attack trains on, which it is measured on (no model)
# ---------------------------------------------------------------------------------------------


def mentions(df: pd.DataFrame, names) -> np.ndarray:
    """Boolean mask: the rows whose text mentions at least one of ``names``."""
    names = clean_names(names)
    if not names or len(df) == 0:
        return np.zeros(len(df), dtype=bool)
    pattern = name_pattern(names)
    return df["text"].map(lambda t: pattern.search(str(t)) is not None).to_numpy(dtype=bool)


def rows_per_name(df: pd.DataFrame, names) -> dict[str, int]:
    return {n: int(mentions(df, [n]).sum()) for n in clean_names(names)}


def choose_names(candidates, share: float, seed: int) -> list[str]:
    """A seeded ``share`` of ``candidates`` (at least one), in the candidates' order."""
    candidates = clean_names(candidates)
    if not candidates:
        raise ValueError("no candidate names to choose from")
    if not 0 < share <= 1:
        raise ValueError(f"share {share} is not in (0, 1]")
    k = min(len(candidates), max(1, round(share * len(candidates))))
    rng = np.random.default_rng([seed, 7368787])  # own stream, independent of other draws
    picked = np.sort(rng.choice(len(candidates), k, replace=False))
    return [candidates[i] for i in picked]


def attack_partition(train_forget: pd.DataFrame, test_forget: pd.DataFrame, chosen) -> dict[str, pd.DataFrame]:
    """``attack``: train_forget rows mentioning a chosen name; ``heldout_train_forget`` and
    ``heldout_test_forget``: train_forget and test_forget rows mentioning none of them."""
    in_train, in_test = mentions(train_forget, chosen), mentions(test_forget, chosen)
    return {
        "attack": train_forget[in_train].reset_index(drop=True),
        "heldout_train_forget": train_forget[~in_train].reset_index(drop=True),
        "heldout_test_forget": test_forget[~in_test].reset_index(drop=True),
    }


def retain_attack_rows(train_retain: pd.DataFrame, n: int, names, seed: int) -> pd.DataFrame:
    """The control's attack set: a seeded draw of ``n`` train_retain rows that mention none of
    ``names``, in split order. ValueError when fewer such rows exist."""
    pool = train_retain[~mentions(train_retain, names)]
    if len(pool) < n:
        raise ValueError(f"train_retain has {len(pool)} rows naming none of the forgotten people, the attack needs {n}")
    rng = np.random.default_rng([seed, 7368788])  # own stream, independent of choose_names'
    picked = np.sort(rng.choice(len(pool), n, replace=False))
    return pool.iloc[picked].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Command line and the checks that need no model
# ---------------------------------------------------------------------------------------------


def build_parser():
    p = cli.parser(__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run folders to attack (qlora.py, spul.py or baselines.py runs); a SPUL run keeps its soft prompt attached and frozen")
    p.add_argument("--names", nargs="+", default=None, metavar="NAME",
                   help="row names in the table and plot, one per RUN (default: each run folder's name)")
    p.add_argument("--force", action="store_true",
                   help="load a run whose manifest does not match the model or files it would be loaded with")
    cli.add_data_args(p)
    g = p.add_argument_group("attack")
    g.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50], metavar="N",
                   help="evaluation points (optimiser steps, positive, increasing); the attack trains to the largest and is evaluated at 0 and at each of them")
    g.add_argument("--attack_share", type=float, default=0.25,
                   help="share in (0, 1] of the forgotten names mentioned in train_forget (seeded by --seed, at least one) whose train_forget rows the attacker trains on")
    g.add_argument("--attack_data", default="forget", choices=ATTACK_DATA,
                   help="forget (default): train on the chosen names' train_forget rows; retain: the control, as many "
                        "train_retain rows naming none of the forgotten people (seeded), true labels, measured on the same "
                        "held-out rows: does any fine-tuning undo the forgetting, or only relearning the people?")
    g.add_argument("--forget_names", nargs="+", default=None, metavar="NAME",
                   help="the forgotten names (default: those recorded by an entities-recipe split folder, e.g. the embedded rt)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of the attack (AdamW, cosine schedule with linear warmup)")
    g.add_argument("--train_batch_size", type=int, default=8, help="attack examples per optimiser step")
    g.add_argument("--warmup_ratio", type=float, default=0.05, help="share of the attack's steps with linear warmup")
    g.add_argument("--lora_r", type=int, default=8, help="rank r of the attacker's LoRA adapter")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA scaling alpha (default: 2 * --lora_r)")
    g.add_argument("--lora_dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--eval_batch_size", type=int, default=32, help="examples per evaluation forward")
    g = p.add_argument_group("output")
    g.add_argument("--output_path", required=True, help="folder to write relearn.json, relearn.md and relearn.png into (written atomically)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


def check_args(args) -> None:
    """Flag values alone (no files)."""
    cli.check_common(args)
    steps = args.steps
    if any(s < 1 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
        raise cli.UsageError(f"--steps {' '.join(map(str, steps))}: must be positive and strictly increasing")
    checks = {
        "attack_share": (0 < args.attack_share <= 1, "must be in (0, 1]"),
        "lora_r": (args.lora_r >= 1, "must be at least 1"),
        "lora_alpha": (args.lora_alpha is None or args.lora_alpha > 0, "must be positive"),
        "lora_dropout": (0 <= args.lora_dropout < 1, "must be in [0, 1)"),
        "warmup_ratio": (0 <= args.warmup_ratio < 1, "must be in [0, 1)"),
    }
    for name, (ok, why) in checks.items():
        if not ok:
            raise cli.UsageError(f"--{name} {getattr(args, name)}: {why}")
    missing = [s for s in ("test_retain", "test_forget") if s not in args.eval_splits]
    if missing:
        raise cli.UsageError(f"--eval_splits: the attack is measured on test_retain and test_forget; {', '.join(missing)} left out")
    if args.names is not None and len(args.names) != len(args.runs):
        raise cli.UsageError(f"--names: give one name per RUN ({len(args.names)} names for {len(args.runs)} runs)")
    names = row_names(args)
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        flag = "--names" if args.names else "RUN"
        raise cli.UsageError(f"{flag}: two runs would share the row name '{dup}' (pass distinct --names)")

    if launched_world_size() > 1:
        raise cli.UsageError("relearn runs in one process; launch it without accelerate/torchrun")


def row_names(args) -> list[str]:
    return list(args.names) if args.names else [Path(r).resolve().name for r in args.runs]


def check_runs(args) -> list[dict]:
    """Each RUN is a finished run folder of a loadable kind, bound to the files it points to,
    with a tokenizer that fits ``--max_length``. Returns the manifests."""
    manifests = []
    for run in args.runs:
        manifest, tokenizer = read_run_tokenizer(run)
        task = resolve_task(args.dataset, args.task)
        cli.check_max_length(Encoder(tokenizer, args.max_length, task=task), task.all_words)
        check_binding(run, manifest, args.force, "RUN")
        manifests.append(manifest)
    return manifests


def resolve_names(args) -> list[str]:
    try:
        names = forgotten_names(args.forget_names, cli.data_config(args))
    except AugmentError as e:
        raise cli.UsageError(str(e)) from e
    names = clean_names(names)
    if not names:
        raise cli.UsageError("--forget_names: no names given")
    return names


def plan_attack(args, splits) -> dict:
    """The names, the chosen ones and the row sets, with every check on them."""
    names = resolve_names(args)
    train_forget, test_forget = splits["train_forget"], splits["test_forget"]
    in_train, in_test = rows_per_name(train_forget, names), rows_per_name(test_forget, names)
    if args.forget_names:
        unknown = [n for n in names if not in_train[n] and not in_test[n]]
        if unknown:
            raise cli.UsageError(f"--forget_names: no train_forget or test_forget text mentions {', '.join(repr(n) for n in unknown)}")
    candidates = [n for n in names if in_train[n]]
    if not candidates:
        raise cli.UsageError("--forget_names: no train_forget text mentions any of the forgotten names, so there is nothing to attack with")
    chosen = choose_names(candidates, args.attack_share, args.seed)
    sets = attack_partition(train_forget, test_forget, chosen)
    shown = ", ".join(chosen)
    if sets["attack"].empty:  # cannot happen: every candidate is mentioned in train_forget
        raise cli.UsageError(f"--attack_share {args.attack_share}: the chosen names ({shown}) leave the attack set empty")
    for key, split in (("heldout_train_forget", "train_forget"), ("heldout_test_forget", "test_forget")):
        if sets[key].empty:
            raise cli.UsageError(
                f"--attack_share {args.attack_share}: every {split} row mentions a chosen name ({shown}); "
                f"no held-out {split} rows remain (lower --attack_share or pass other --forget_names)"
            )
    if args.attack_data == "retain":  # the control: same count, same held-out rows
        try:
            sets["attack"] = retain_attack_rows(splits["train_retain"], len(sets["attack"]), names, args.seed)
        except ValueError as e:
            raise cli.UsageError(f"--attack_data retain: {e}") from e
    sets["test_retain"] = splits["test_retain"]
    return {
        "names": names,
        "candidates": candidates,
        "chosen": chosen,
        "held_out_names": [n for n in names if n not in chosen],
        "rows_per_name": {"train_forget": in_train, "test_forget": in_test},
        "sets": sets,
    }


def warn_other_data(args, manifests, splits) -> None:
    """A run unlearned another train_forget (other data flags?): say so, once per run."""
    now = split_fingerprint({"train_forget": splits["train_forget"]})["train_forget"]["sha256"]
    for run, manifest in zip(args.runs, manifests):
        was = (manifest.get("splits") or {}).get("train_forget", {}).get("sha256")
        if was and was != now:
            print(f"warning: RUN {run}: was made with another train_forget than these data flags give; "
                  f"its held-out rows may not be the ones it unlearned", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# The attack on one loaded run
# ---------------------------------------------------------------------------------------------


def attack_targets(lm) -> list[str]:
    """Leaf names of the causal LM's linear layers (attention and MLP), without the LM head;
    the project's attention-only choice for architectures without plain linear layers."""
    head = lm.get_output_embeddings()
    names = {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if n and isinstance(m, torch.nn.Linear) and m is not head}
    return sorted(names) or lora_target_modules(lm)


def label_ce(prompt):
    """``loss_fn`` for ``train``: cross-entropy on the label tokens, ``prompt`` prepended."""
    def loss_fn(model, batch):
        loss = ce_per_sample(label_logits(model, batch, prompt=prompt), batch["label_ids"]).mean()
        return loss, {"ce": loss.item()}

    return loss_fn


class StepEvaluator:
    """Wraps a ``loss_fn``: before the loss of step s + 1 (the weights are then those after s
    optimiser steps) it calls ``evaluate()`` when s is one of ``at``, and keeps the result."""
    def __init__(self, loss_fn, evaluate, at):
        self.loss_fn, self.evaluate, self.at = loss_fn, evaluate, set(at)
        self.done = 0  # optimiser steps taken before the current call
        self.results: dict[int, dict] = {}
        self.seconds = 0.0

    def run(self, step: int) -> None:
        t0 = time.perf_counter()
        self.results[step] = self.evaluate()
        self.seconds += time.perf_counter() - t0

    def __call__(self, model, batch):
        if self.done in self.at and self.done not in self.results:
            self.run(self.done)
        self.done += 1
        return self.loss_fn(model, batch)


def epochs_for(steps: int, rows: int, batch_size: int) -> float:
    """``num_epochs`` for which ``train`` takes exactly ``steps`` optimiser steps."""
    per_epoch = math.ceil(rows / batch_size)
    epochs = steps / per_epoch
    while math.ceil(per_epoch * epochs) > steps:  # float rounding
        epochs = math.nextafter(epochs, 0)
    while math.ceil(per_epoch * epochs) < steps:
        epochs = math.nextafter(epochs, math.inf)
    return epochs


def attack_run(args, run, device, sets) -> dict:
    """Load ``run``, attack it, and return its record (accuracy per step per held-out set)."""
    loaded, forced = load_checked(run, device, args.force, flag="RUN")
    prompt = loaded.prompt.detach() if loaded.prompt is not None else None
    snapshot = prompt.clone() if prompt is not None else None
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    seed_everything(args.seed)  # the same adapter initialisation and dropout for every run
    lm = unwrap(loaded.model)
    targets = attack_targets(lm)
    alpha = args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r
    model = add_lora(lm, lora_config(args.lora_r, alpha, args.lora_dropout, target_modules=targets))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, _ in params), "only the attacker's adapter trains"

    encoder = Encoder(loaded.tokenizer, args.max_length, task=resolve_task(args.dataset, args.task))
    held = {k: sets[k] for k in HELDOUT}

    def evaluate():
        return evaluate_splits(model, encoder, held, args.eval_batch_size, device, prompt=prompt, split_names=list(HELDOUT),
                              input_filter=loaded.input_filter)

    features = encode_frame(encoder, sets["attack"], is_forget=args.attack_data == "forget")  # true labels either way
    total = max(args.steps)
    cfg = TrainConfig(args.lr, epochs_for(total, len(features), args.train_batch_size), args.train_batch_size,
                      warmup_ratio=args.warmup_ratio, seed=args.seed)
    evaluator = StepEvaluator(label_ce(prompt), evaluate, [0] + list(args.steps[:-1]))
    stats = train(model, [p for _, p in params], evaluator, features, cfg, device, loaded.tokenizer.pad_token_id,
                  desc=f"relearn {Path(run).name}")
    if stats.steps != total:
        raise RuntimeError(f"the attack took {stats.steps} steps, expected {total}")
    train_seconds = sum(stats.epoch_seconds) - evaluator.seconds  # the evaluations ran inside train's epochs
    evaluator.run(total)

    metrics = {s: evaluator.results[s] for s in [0] + list(args.steps)}
    unchanged = True if prompt is None else bool(torch.equal(prompt, snapshot))
    if not unchanged:
        raise RuntimeError("the prompt changed during the attack")
    record = {
        "path": str(Path(run).resolve()),
        "kind": loaded.manifest.get("kind"),
        "method": loaded.manifest.get("method"),  # a baseline's unlearning method
        "prompt": None if prompt is None else {"shape": list(prompt.shape), "unchanged": unchanged},
        "forced_mismatches": forced,
        "lora": {"r": args.lora_r, "alpha": alpha, "dropout": args.lora_dropout, "target_modules": targets,
                 "trainable_params": sum(p.numel() for _, p in params)},
        "train": {"steps": stats.steps, "num_epochs": cfg.num_epochs, "losses": stats.losses,
                  "seconds": train_seconds,
                  "eval_seconds": evaluator.seconds, "peak_memory_mb": stats.peak_memory_mb},
        "accuracy": {str(s): {k: m[k]["accuracy"] for k in HELDOUT} for s, m in metrics.items()},
        "metrics": {str(s): m for s, m in metrics.items()},
    }
    del model, lm, loaded, params
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def attack_description(attack_data: str, rows: int, chosen) -> str:
    """What the attack trained on, in words (the log's, the table's and the plot's title)."""
    if attack_data == "retain":
        return (f"{rows} train_retain rows naming none of the forgotten people (the control; its held-out rows are "
                f"those of the attack on {', '.join(chosen)})")
    return f"{rows} train_forget rows naming {', '.join(chosen)}"


def described(result: dict) -> str:
    return attack_description(result["config"]["attack_data"], result["rows"]["attack"], result["names"]["chosen"])


def markdown(result: dict) -> str:
    lines = [
        f"Relearning attack: LoRA r={result['config']['lora_r']}, lr={result['config']['lr']:g}, "
        f"trained on {described(result)}; accuracy (%) on the forget rows naming none of the chosen people, and on test retain.",
        "",
        "| run | step | " + " | ".join(f"{TITLES[k]} ACC" for k in HELDOUT) + " |",
        "|---" * (len(HELDOUT) + 2) + "|",
    ]
    for name, rec in result["runs"].items():
        for step, acc in rec["accuracy"].items():
            lines.append(f"| {name} | {step} | " + " | ".join(f"{acc[k]:.2f}" for k in HELDOUT) + " |")
    counts = ", ".join(f"{TITLES[k]} {result['rows'][k]}" for k in HELDOUT)
    lines += ["", f"Rows: {counts}."]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key in zip(axes, HELDOUT[:2]):
        for name, rec in result["runs"].items():
            steps = [int(s) for s in rec["accuracy"]]
            ax.plot(steps, [rec["accuracy"][str(s)][key] for s in steps], marker="o", label=name)
        ax.set_title(f"{TITLES[key]} ({result['rows'][key]} rows)")
        ax.set_xlabel("attack steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)  (higher: more relearned)")
    axes[0].legend()
    fig.suptitle(f"Fine-tuned on {described(result)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@cli.entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    out = Path(args.output_path)
    check_output(out, args.overwrite)
    seed_everything(args.seed)
    splits = prepare_splits(cli.data_config(args))
    plan = plan_attack(args, splits)
    manifests = check_runs(args)  # before any model is loaded
    warn_other_data(args, manifests, splits)
    sets = plan.pop("sets")
    print(f"attack: {attack_description(args.attack_data, len(sets['attack']), plan['chosen'])}; held-out: "
          + ", ".join(f"{TITLES[k]} {len(sets[k])}" for k in HELDOUT))

    device = select_device()
    runs = {}
    for name, run in zip(row_names(args), args.runs):
        runs[name] = attack_run(args, run, device, sets)
    result = {
        "config": {**vars(args), "max_steps": max(args.steps), "schedule": "cosine with linear warmup over max_steps"},
        "names": plan,
        "rows": {"attack": len(sets["attack"]), **{k: len(sets[k]) for k in HELDOUT}},
        "steps": [0] + list(args.steps),
        "runs": runs,
        "versions": library_versions(),
    }
    with atomic_run_dir(out, args.overwrite) as tmp:
        write_json(tmp / JSON, result)
        (tmp / MARKDOWN).write_text(markdown(result) + "\n")
        plot(result, tmp / PLOT)
    print(markdown(result))
    print(f"results: {out / JSON}")


if __name__ == "__main__":
    main()
