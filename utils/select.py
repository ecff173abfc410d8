"""Model selection on the validation splits: pick one setting per method from a grid of run
folders by one stated criterion, and write the chosen flags where the table recipes read them.

The criterion reads only ``val_retain``, ``val_forget`` and ``train_forget`` (the unlearning
request itself); the test splits are never read (``scripts/select.sh`` runs the grid with
``--eval_splits`` leaving them out, and this module refuses a metric it does not need):

1. utility constraint: val_retain ACC >= the reference's (the QLoRA run's) val_retain ACC
   minus ``max_drop`` points (5 by default, the project's target);
2. among the runs that meet it, the lowest forget score, the mean of train_forget ACC and
   val_forget ACC (forgetting the requested examples and unseen examples of the same people);
3. ties: the higher val_retain ACC, then the first run in the grid's order.

A method none of whose runs meets the constraint gets the run with the highest val_retain ACC
(the setting that damages the model least) and is marked ``"constraint_met": false``.

A grid run on several seeds (``scripts/select.sh``'s ``SELECT_SEEDS``) is judged per setting on
each metric combined over the seeds (``--over_seeds``: ``mean``, the default, or ``worst``, each
metric at its worst seed: the lowest val_retain, the highest train_forget and val_forget, so that
one seed that fails cannot hide behind one that does well), against the mean val_retain of the
seeds' QLoRA runs; the setting's run on the first seed stands for it in the env file
(``SELRUN_``, ``SEL_SEED``).

    python -m utils.select --reference RUN_QLORA --runs RUN [RUN ...] --json selected.json --env selected.env

``--best`` pools the runs of every method and prints the one run folder the same criterion picks
(``scripts/audit.sh`` audits that baseline beside SPUL). An eval folder (``inference_spul.py``)
counts as the run it evaluated, and ``--best`` prints that run's folder.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from utils.baselines import hparam_flags
from utils.runs import CONFIG, MANIFEST, METRICS, read_json, trained_run, write_json

READ = ("val_retain", "val_forget", "train_forget")  # the only metrics the criterion sees
# flags a grid varies, per run kind; their selected values are what the recipes pass on
TUNED = {
    "spul": ("lr", "num_epochs", "alpha", "beta", "prompt_norm", "stratify_batches", "counterfactual_retain", "forget_swaps", "forget_typos", "pseudo_retain", "hard_prefix",
             "generic_label", "ema_decay"),
    "baseline": ("lr", "num_epochs", "retain_weight", "stratify_batches", "counterfactual_retain", "pseudo_retain", "generic_label", "ema_decay",
                 *hparam_flags()),  # and each method's own (Method.hparams)
}


# how a setting's runs on several seeds are combined, per metric (name -> (metric, values) -> value)
OVER_SEEDS = {
    "mean": lambda metric, values: sum(values) / len(values),
    "worst": lambda metric, values: min(values) if metric == "val_retain" else max(values),
}


class SelectionError(ValueError):
    """A run folder the selection cannot use; one line naming it."""


def read_run(folder: Path) -> dict:
    """What selection needs of one run folder: method name, tuned flags, the three metrics."""
    folder = Path(folder)
    for f in (METRICS, CONFIG, MANIFEST):
        if not (folder / f).is_file():
            raise SelectionError(f"{folder}: no {f} (not a finished run)")
    metrics, config, manifest = read_json(folder / METRICS), read_json(folder / CONFIG), read_json(folder / MANIFEST)
    trained = trained_run(folder)
    if trained != folder:  # an evaluation of a run: that run's method and flags
        manifest = manifest["evaluated"]
        config = read_json(trained / CONFIG) if (trained / CONFIG).is_file() else {}
    missing = [s for s in READ if s not in metrics]
    if missing:
        raise SelectionError(f"{folder}: no metrics for {', '.join(missing)} (run it with validation splits)")
    kind = manifest.get("kind")
    method = manifest.get("method") if kind == "baseline" else kind
    off = {"counterfactual_retain": 0, "forget_swaps": 0, "forget_typos": 0, "pseudo_retain": 0, "hard_prefix": "none", "ema_decay": 0}  # flags whose default value means "not given"
    flags = {k: config.get(k) for k in TUNED.get(kind, ())
             if config.get(k) is not None and config.get(k) is not False and config.get(k) != off.get(k, object())}
    return {"run": str(folder), "trained_run": str(trained), "method": method, "flags": flags, "seed": config.get("seed"),
            **{s: float(metrics[s]["accuracy"]) for s in READ}}


CANDIDATE_STRIDE = 1000  # candidate k of a seeded search runs with seed + 1000 k


def attempt_seeds(seed: int, restarts: int) -> list[int]:
    """The seed of each candidate of a seeded search on validation data, the first being ``seed``:
    ``spul.py --restarts`` (one attempt, then up to ``restarts`` more) and ``baselines.py
    --icl_draws`` (``restarts`` = draws - 1)."""
    return [seed + CANDIDATE_STRIDE * k for k in range(restarts + 1)]


def forget_score(run: dict) -> float:
    return (run["train_forget"] + run["val_forget"]) / 2


def choose(runs: list[dict], reference_val_retain: float, max_drop: float = 5.0) -> dict:
    """The criterion of the module docstring, on runs of one method (in grid order)."""
    floor = reference_val_retain - max_drop
    ok = [r for r in runs if r["val_retain"] >= floor]
    if ok:
        best = min(ok, key=lambda r: (forget_score(r), -r["val_retain"]))  # min keeps the first of ties
        met = True
    else:
        best = max(runs, key=lambda r: r["val_retain"])
        met = False
    return {**best, "forget_score": forget_score(best), "constraint_met": met, "val_retain_floor": floor,
            "candidates": len(runs)}


def settings(runs: list[dict], over_seeds: str = "mean") -> list[dict]:
    """Runs of one method grouped by their flags, one entry per grid setting (in grid order). A
    setting run on several seeds gets each metric combined over its runs (``OVER_SEEDS[over_seeds]``),
    and its first run stands for it (``run``; all of them in ``runs``). Every setting must have run
    on the same seeds."""
    combine = OVER_SEEDS[over_seeds]
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(json.dumps(r["flags"], sort_keys=True), []).append(r)
    seed_sets = {tuple(sorted(str(r["seed"]) for r in g)) for g in groups.values()}
    for g in groups.values():
        if len({r["seed"] for r in g}) != len(g):
            raise SelectionError(f"{g[0]['run']}: two runs of the same setting with the same seed")
    if len(seed_sets) > 1:
        raise SelectionError(f"the settings of {runs[0]['method']} ran on different seeds "
                             f"({' vs '.join(','.join(s) for s in sorted(seed_sets))}); run each setting on every seed")
    return [{**g[0], **{m: combine(m, [r[m] for r in g]) for m in READ},
             "seeds": [r["seed"] for r in g], "runs": [r["run"] for r in g]} for g in groups.values()]


def select_all(references, run_dirs, max_drop: float = 5.0, over_seeds: str = "mean") -> dict:
    """The selection over ``run_dirs``: per method, the criterion on its settings (each combined over
    its seeds by ``over_seeds``), the utility bound measured against the mean val_retain of
    ``references`` (one QLoRA run per seed; a single path is one reference)."""
    if over_seeds not in OVER_SEEDS:
        raise SelectionError(f"--over_seeds {over_seeds}: not one of {', '.join(OVER_SEEDS)}")
    references = [references] if isinstance(references, (str, Path)) else list(references)
    ref_val = []
    for reference in references:
        ref = read_json(Path(reference) / METRICS)
        if "val_retain" not in ref:
            raise SelectionError(f"--reference {reference}: no val_retain metrics")
        ref_val.append(float(ref["val_retain"]["accuracy"]))
    by_method: dict[str, list[dict]] = {}
    for d in run_dirs:
        r = read_run(Path(d))
        by_method.setdefault(r["method"], []).append(r)
    grid = {m: settings(rs, over_seeds) for m, rs in by_method.items()}
    reference_val_retain = sum(ref_val) / len(ref_val)
    chosen = {m: choose(rs, reference_val_retain, max_drop) for m, rs in grid.items()}
    return {"criterion": __doc__.split("\n\n")[1].strip(),
            "reference": str(references[0]) if len(references) == 1 else [str(r) for r in references],
            "reference_val_retain": reference_val_retain, "max_drop": max_drop, "over_seeds": over_seeds,
            "grid": {m: [{k: r[k] for k in ("run", "runs", "seeds", "flags", *READ)} for r in rs] for m, rs in grid.items()},
            "selected": chosen}


def env_lines(selection: dict) -> list[str]:
    """Per method, for ``scripts/common.sh`` to source: ``SEL_<METHOD>="--flag value ..."`` (the
    chosen flags) and ``SELRUN_<METHOD>=<run folder>`` (the chosen run itself, trained with
    ``--seed $SEL_SEED``: the table recipes evaluate it on test instead of training it again)."""
    lines = ["# written by python -m utils.select (scripts/select.sh); the flags chosen on validation data"]
    seeds = {r["seed"] for r in selection["selected"].values()}
    if len(seeds) == 1 and None not in seeds:
        lines.append(f"SEL_SEED={seeds.pop()}")
    for method, r in selection["selected"].items():
        lines.append(f"SEL_{method.upper()}={shlex.quote(flag_text(r['flags']))}")
        lines.append(f"SELRUN_{method.upper()}={shlex.quote(r['run'])}")
    return lines


def updated_env_lines(selection: dict, previous: str) -> list[str]:
    """``env_lines`` for a selection of some methods only (``--update``): the lines of the methods
    it did not select are kept from ``previous`` (the existing env file's text). Refuses when the
    kept lines were chosen on another seed, since ``SEL_SEED`` names one seed for every ``SELRUN_``."""
    new, old = env_lines(selection), previous.splitlines()
    new_seed = [line for line in new if line.startswith("SEL_SEED=")]
    old_seed = [line for line in old if line.startswith("SEL_SEED=")]
    if new_seed and old_seed and new_seed != old_seed:
        raise SelectionError(f"--update: the env file was selected with {old_seed[0]}, these runs with "
                             f"{new_seed[0]}; select every method on one seed")
    ours = {m.upper() for m in selection["selected"]} | {"SEED"}
    kept = [line for line in old if (m := re.match(r"SEL(?:RUN)?_(\w+)=", line)) and m.group(1) not in ours]
    return new + (old_seed if not new_seed else []) + kept


def flag_text(flags: dict) -> str:
    """The flags of one setting as they go on a command line (``--lr 1e-05 --stratify_batches``)."""
    return " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in flags.items())


def grid_table(selection: dict) -> str:
    """The whole grid as a markdown table: every setting with its (mean) validation metrics,
    its forget score, whether it keeps val_retain within the bound, and the choice in bold. What
    ``scripts/select.sh`` prints and writes next to ``selected.json``."""
    floor = selection["reference_val_retain"] - selection["max_drop"]
    lines = [f"utility bound: val_retain >= {floor:.2f} (reference {selection['reference_val_retain']:.2f} - "
             f"{selection['max_drop']:g}); forget score: mean of train_forget and val_forget (lower forgets more); "
             f"ACC in %, {selection.get('over_seeds', 'mean')} over the seeds",
             "",
             "| method | setting | seeds | train forget | val retain | val forget | forget score | within bound |",
             "|---|---|---|---|---|---|---|---|"]
    for method, rows in selection["grid"].items():
        chosen = selection["selected"][method]["run"]
        for r in rows:
            mark = " **chosen**" if r["run"] == chosen else ""
            seeds = ", ".join(str(s) for s in r["seeds"])
            lines.append(f"| {method} | {flag_text(r['flags'])}{mark} | {seeds} | {r['train_forget']:.2f} | "
                         f"{r['val_retain']:.2f} | {r['val_forget']:.2f} | {forget_score(r):.2f} | "
                         f"{'yes' if r['val_retain'] >= floor else 'no'} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, nargs="+",
                   help="the QLoRA run folder the utility constraint is measured against; one per seed when the grid "
                        "ran on several seeds (the bound is then measured against their mean val_retain)")
    p.add_argument("--runs", nargs="+", required=True, help="the grid's run folders (any methods, grouped by the method in each manifest)")
    p.add_argument("--max_drop", type=float, default=5.0, help="largest allowed val_retain ACC drop below the reference, in points")
    p.add_argument("--over_seeds", choices=sorted(OVER_SEEDS), default="mean",
                   help="how a setting run on several seeds is scored: mean (each metric's mean over the seeds) or "
                        "worst (each metric at its worst seed: lowest val_retain, highest train_forget and val_forget)")
    p.add_argument("--json", help="write the selection (criterion, grid, choices) here")
    p.add_argument("--markdown", help="write the whole grid as a markdown table here (it is also printed)")
    p.add_argument("--env", help="write SEL_<METHOD>=\"flags\" lines here (sourced by the table recipes)")
    p.add_argument("--update", action="store_true",
                   help="replace only the lines of the methods in --runs in an existing --env file and keep the other "
                        "methods' (e.g. after re-running one method's grid)")
    p.add_argument("--best", action="store_true",
                   help="pool every method's runs and print only the folder of the run the criterion picks (the trained "
                        "run, for an eval folder)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.best:
        try:
            if len(args.reference) != 1:
                raise SelectionError("--best: give one --reference (the runs' seed)")
            ref = read_json(Path(args.reference[0]) / METRICS)
            best = choose([read_run(Path(d)) for d in args.runs], float(ref["val_retain"]["accuracy"]), args.max_drop)
        except (SelectionError, FileNotFoundError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(best["trained_run"])
        return 0
    for flag in ("json", "markdown", "env"):  # checked before any run is read, so nothing is half-written
        path = getattr(args, flag)
        if path and not Path(path).parent.is_dir():
            print(f"error: --{flag} {path}: its folder {Path(path).parent} does not exist", file=sys.stderr)
            return 2
    try:
        selection = select_all(args.reference, args.runs, args.max_drop, args.over_seeds)
        env = Path(args.env) if args.env else None
        if env and args.update and env.is_file():
            lines = updated_env_lines(selection, env.read_text())
        else:
            lines = env_lines(selection)
    except (SelectionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = grid_table(selection)
    print(table)
    for method, r in selection["selected"].items():
        mark = "" if r["constraint_met"] else "  (no run keeps val_retain within the bound: least damage)"
        print(f"{method}: {r['flags']}  val_retain {r['val_retain']:.2f}  forget score {r['forget_score']:.2f}{mark}")
    if args.json:
        write_json(Path(args.json), selection)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if env:
        env.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
