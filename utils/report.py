"""Collect run folders into the paper's table layout: one row per method, ACC and F1 on
train retain, train forget, test retain and test forget (and on val retain / val forget when
every run has them), the forgetting audit, and efficiency columns from each run's
train_stats.json. Folders that differ only in a ``-s<seed>`` suffix form one row with
mean ± std. Writes markdown, CSV, a trade-off plot (forget vs retain accuracy) and an MIA plot
(forget-set MIA AUC vs test retain accuracy).

Audit columns (utils.mia), from each run's audit.json and records.jsonl: the forget-set
membership-inference AUC under the LOSS and the stable logit score; when a retrain oracle of
the same seed is among the runs (a ``qlora.py --retain_only`` run, found by its manifest),
privleak against it and the KS forget-quality p-value on train_forget.

Seed spread (``--spread``), for every row with two seeds or more, from the runs' per-review
records: each split's accuracy per seed, its std, the std that independent review-by-review
chance alone would give (``utils.metrics.seed_spread``) and the share of reviews with the same
outcome on every seed; it tells whole seeds that differ from coin flips spread over reviews.

Paired differences (``--paired ROW``), for every other row whose seeds all have a run of ROW
(for example QLoRA, the model every unlearning run starts from) with the same seed: per split,
the mean of the per-seed ACC differences (row minus ROW), their std and a 95% Student-t
interval over the seeds (``utils.metrics.paired_difference``). Pairing by seed removes what a
method and its starting model share on that seed.

    python -m utils.report RUN [RUN ...] [--names NAME ...] [--markdown F] [--csv F] [--plot F.png] [--mia_plot F.png]
                           [--spread F.md] [--paired ROW [--paired_markdown F.md]]
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import numpy as np

from utils import mia
from utils.baselines import METHODS
from utils.data import EVAL_SPLITS
from utils.evaluation import label_token_ids
from utils.metrics import paired_difference, seed_spread
from utils.models import load_tokenizer
from utils.runs import AUDIT, MANIFEST, METRICS, RECORDS, TOKENIZER_DIR, read_json, read_records
from utils.task import SENTIMENT, TASKS
from utils.template import Encoder

DISPLAY = {
    "vanilla": "Vanilla (argmax)",
    "vanilla-generate": "Vanilla (generate)",
    "qlora": "QLoRA",
    "retrain": "Retrain",
    **{name: method.display for name, method in METHODS.items()},  # the baselines' registry
    "spul": "SPUL",
}
EFFICIENCY = (  # (train_stats key, column title, format)
    ("trainable_params", "trainable params", "{:,.0f}"),
    ("seconds_per_epoch", "s / epoch", "{:.1f}"),
    ("peak_memory_mb", "peak MiB", "{:.0f}"),
    ("tokens_per_second", "train tok/s", "{:.0f}"),
)
SEED_SUFFIX = re.compile(r"-s\d+$")


def row_name(folder: Path) -> str:
    base = SEED_SUFFIX.sub("", folder.name)
    return DISPLAY.get(base, base)


AUDIT_COLUMNS = (  # (summary key, column title, format)
    ("forget_loss_auc", "MIA AUC forget (LOSS)", "{:.3f}"),
    ("forget_logit_auc", "MIA AUC forget (logit)", "{:.3f}"),
    ("privleak_loss", "privleak % (LOSS)", "{:+.1f}"),
    ("privleak_logit", "privleak % (logit)", "{:+.1f}"),
    ("ks_p", "KS p (forget quality)", "{:.3g}"),
)
AUDIT_CSV_ONLY = ("retain_loss_auc", "retain_logit_auc")


def is_oracle(manifest: dict) -> bool:
    """A retrain oracle (qlora.py --retain_only), or an eval folder of one."""
    return bool(manifest.get("retain_only") or (manifest.get("evaluated") or {}).get("retain_only"))


def collect(run_dirs, names=None) -> dict[str, list[dict]]:
    """{row name: [{"metrics", "stats", "audit", "manifest", "dir"} per seed]} in first-seen order."""
    names = names or [row_name(Path(d)) for d in run_dirs]
    rows: dict[str, list[dict]] = {}
    for name, d in zip(names, run_dirs):
        d = Path(d)
        if not (d / METRICS).is_file():
            raise FileNotFoundError(f"{d}: no {METRICS} (not a finished run)")
        stats = read_json(d / "train_stats.json") if (d / "train_stats.json").is_file() else {}
        audit = read_json(d / AUDIT) if (d / AUDIT).is_file() else {}
        manifest = read_json(d / MANIFEST) if (d / MANIFEST).is_file() else {}
        rows.setdefault(name, []).append({"metrics": read_json(d / METRICS), "stats": stats, "audit": audit,
                                          "manifest": manifest, "dir": d})
    return rows


def split_records(run_dir: Path, split: str) -> list[dict]:
    """A run's records of ``split``, in row order."""
    return sorted((r for r in read_records(run_dir) if r["split"] == split), key=lambda r: r["row"])


def true_label_probs(run_dir: Path, split: str = "train_forget") -> tuple[np.ndarray, np.ndarray]:
    """(labels, p(true label)) of ``split`` from a run's records, in row order."""
    rows = split_records(run_dir, split)
    labels = np.array([r["label"] for r in rows], dtype=int)
    return labels, np.exp(mia.true_logprob([r["label_logprobs"] for r in rows], labels))


def add_audit(rows: dict[str, list[dict]]) -> None:
    """Fill each run's ``audit_figures``: its MIA AUCs and, against the retrain oracle of the
    same seed (if one is among the runs), privleak and the KS forget-quality p-value."""
    oracles = {r["manifest"].get("seed"): r for rs in rows.values() for r in rs if is_oracle(r["manifest"]) and r["audit"]}
    for runs in rows.values():
        for r in runs:
            fig = {}
            auc = r["audit"].get("mia", {})
            for side in ("forget", "retain"):
                for score in mia.SCORES:
                    if side in auc:
                        fig[f"{side}_{score}_auc"] = auc[side][f"{score}_auc"]
            oracle = oracles.get(r["manifest"].get("seed"))
            if oracle is not None and "forget" in auc and "forget" in oracle["audit"]["mia"]:
                for score in mia.SCORES:
                    fig[f"privleak_{score}"] = mia.privleak(auc["forget"][f"{score}_auc"], oracle["audit"]["mia"]["forget"][f"{score}_auc"])
                if (r["dir"] / RECORDS).is_file():
                    labels, p_run = true_label_probs(r["dir"])
                    oracle_labels, p_oracle = true_label_probs(oracle["dir"])
                    if not np.array_equal(labels, oracle_labels):
                        raise ValueError(f"{r['dir']}: its train_forget rows differ from the retrain oracle's ({oracle['dir']}): "
                                         f"not the same data (--data_seed, caps)")
                    fig["ks_p"] = mia.forget_quality(p_run, p_oracle)
            r["audit_figures"] = fig


def shown_splits(rows: dict[str, list[dict]]) -> list[str]:
    """The splits every run has metrics for, in ``EVAL_SPLITS`` order (paper splits and val)."""
    runs = [r for rs in rows.values() for r in rs]
    return [s for s in EVAL_SPLITS if all(s in r["metrics"] for r in runs)]


def summarise(runs: list[dict], splits=None) -> dict:
    """Mean and std (population, 0 for one seed) of ACC/F1 per split and of the efficiency."""
    out = {"seeds": len(runs), "splits": list(splits or shown_splits({"": runs}))}
    for s in out["splits"]:
        for m in ("accuracy", "f1"):
            v = np.array([r["metrics"][s][m] for r in runs], dtype=float)
            out[f"{s}_{m}"] = (v.mean(), v.std())
    for key, _, _ in EFFICIENCY:
        v = [r["stats"][key] for r in runs if key in r["stats"]]
        out[key] = float(np.mean(v)) if v else None
    for key in [k for k, _, _ in AUDIT_COLUMNS] + list(AUDIT_CSV_ONLY):
        v = np.array([r.get("audit_figures", {})[key] for r in runs if key in r.get("audit_figures", {})], dtype=float)
        out[key] = (v.mean(), v.std()) if len(v) == len(runs) else None  # only when every seed has it
    return out


def _audit_cell(value, fmt: str, seeds: int) -> str:
    """``mean`` (one seed) or ``mean±std``; the std without the sign ``fmt`` may force."""
    if value is None:
        return "-"
    mean, std = value
    return fmt.format(mean) + ("±" + fmt.replace("+", "").format(std) if seeds > 1 else "")


def _cell(mean_std, seeds: int) -> str:
    mean, std = mean_std
    return f"{mean:.2f}±{std:.2f}" if seeds > 1 else f"{mean:.2f}"


def _splits(summary: dict[str, dict]) -> list[str]:
    return next(iter(summary.values()))["splits"] if summary else []


def markdown(summary: dict[str, dict]) -> str:
    splits = _splits(summary)
    audit = [c for c in AUDIT_COLUMNS if any(r.get(c[0]) is not None for r in summary.values())]
    head = ["method"] + [f"{s.replace('_', ' ')} ACC / F1" for s in splits] + [t for _, t, _ in audit] + [t for _, t, _ in EFFICIENCY]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in summary.items():
        cells = [f"{_cell(r[f'{s}_accuracy'], r['seeds'])} / {_cell(r[f'{s}_f1'], r['seeds'])}" for s in splits]
        cells += [_audit_cell(r.get(k), fmt, r["seeds"]) for k, _, fmt in audit]
        cells += [fmt.format(r[k]) if r[k] is not None else "-" for k, _, fmt in EFFICIENCY]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(summary: dict[str, dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        metric_cols = [f"{s}_{m}" for s in _splits(summary) for m in ("accuracy", "f1")]
        audit = [k for k, _, _ in AUDIT_COLUMNS] + list(AUDIT_CSV_ONLY)
        w.writerow(["method", "seeds"] + metric_cols + [c + "_std" for c in metric_cols] + [k for k, _, _ in EFFICIENCY]
                   + audit + [k + "_std" for k in audit])
        for name, r in summary.items():
            w.writerow(
                [name, r["seeds"]]
                + [f"{r[c][0]:.2f}" for c in metric_cols]
                + [f"{r[c][1]:.2f}" for c in metric_cols]
                + ["" if r[k] is None else f"{r[k]:.2f}" for k, _, _ in EFFICIENCY]
                + ["" if r.get(k) is None else f"{r[k][0]:.6g}" for k in audit]
                + ["" if r.get(k) is None else f"{r[k][1]:.6g}" for k in audit]
            )


def run_label_ids(run: dict) -> list[int]:
    """The token id each label word is counted as in the run's accuracy (the first token of the
    word after the task's template, ``utils.evaluation.label_token_ids``), from the tokenizer the
    run saved; an eval folder's from the run it evaluated (its ``source``)."""
    manifest = run["manifest"]
    task = TASKS.get((manifest.get("evaluated") or manifest).get("task", SENTIMENT.name), SENTIMENT)
    folders = [run["dir"] / TOKENIZER_DIR] + ([Path(manifest["source"]) / TOKENIZER_DIR] if manifest.get("source") else [])
    folder = next((f for f in folders if f.is_dir()), None)
    if folder is None:
        raise FileNotFoundError(f"{run['dir']}: no {TOKENIZER_DIR}/ here or in the run it evaluated (needed by --spread)")
    encoder = Encoder(load_tokenizer(str(folder)), max_length=4096, task=task)  # the label tokens do not depend on max_length
    return label_token_ids(encoder, task.label_words)


def review_outcomes(run: dict, split: str, label_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, answered with the true label) per review of ``split``, in row order, from the
    run's records; checked against the accuracy in its metrics.json."""
    rows = split_records(run["dir"], split)
    labels = np.array([r["label"] for r in rows], dtype=int)
    correct = np.array([r["pred_id"] == label_ids[r["label"]] for r in rows], dtype=bool)
    expected = run["metrics"][split]["accuracy"]
    if not rows or abs(100 * correct.mean() - expected) > 1e-6:
        raise ValueError(f"{run['dir']}: the records of {split} do not give its metrics.json accuracy ({expected:.2f})")
    return labels, correct


def spreads(rows: dict[str, list[dict]], splits) -> dict[str, dict[str, dict]]:
    """{row name: {split: utils.metrics.seed_spread}} for the rows with two seeds or more."""
    out = {}
    for name, runs in rows.items():
        if len(runs) < 2:
            continue
        ids = run_label_ids(runs[0])
        out[name] = {}
        for split in splits:
            outcomes = [review_outcomes(r, split, ids) for r in runs]
            if any(len(l) != len(outcomes[0][0]) or not np.array_equal(l, outcomes[0][0]) for l, _ in outcomes):
                raise ValueError(f"{name}: the seeds' {split} rows differ (not the same data: --data_seed, caps)")
            out[name][split] = seed_spread(np.stack([c for _, c in outcomes]))
    return out


def spread_markdown(spread: dict[str, dict[str, dict]]) -> str:
    lines = ["| method | split | ACC per seed | std | review-level std | same on every seed |", "|---|---|---|---|---|---|"]
    for name, per_split in spread.items():
        for split, s in per_split.items():
            lines.append(f"| {name} | {split.replace('_', ' ')} | {' / '.join(f'{a:.2f}' for a in s['accuracies'])} "
                         f"| {s['std']:.2f} | {s['review_std']:.2f} | {s['same_share']:.1f}% |")
    return "\n".join(lines)


def reference_row(rows: dict[str, list[dict]], reference: str) -> str:
    """The row ``reference`` names: a row name as printed (``QLoRA``) or a folder's name without
    its seed (``qlora``)."""
    name = reference if reference in rows else DISPLAY.get(reference, reference)
    if name not in rows:
        raise ValueError(f"--paired {reference}: no such row (rows: {', '.join(rows)})")
    return name


def runs_by_seed(runs: list[dict]) -> dict:
    """{seed: run} from each run's manifest ``seed``; one run per seed."""
    out = {}
    for r in runs:
        seed = r["manifest"].get("seed")
        if seed is None or seed in out:
            problem = "no seed in its manifest.json" if seed is None else f"a second run of seed {seed} in its row"
            raise ValueError(f"--paired: {r['dir']}: {problem}")
        out[seed] = r
    return out


def paired(rows: dict[str, list[dict]], reference: str, splits) -> dict[str, dict[str, dict]]:
    """{row name: {split: utils.metrics.paired_difference(row, reference row)}} for every other
    row with two seeds or more whose seeds all have a run in the ``reference`` row."""
    ref = runs_by_seed(rows[reference])
    out = {}
    for name, runs in rows.items():
        if name == reference or len(runs) < 2:
            continue
        mine = runs_by_seed(runs)
        if not set(mine) <= set(ref):
            continue
        seeds = sorted(mine)
        out[name] = {s: paired_difference([mine[k]["metrics"][s]["accuracy"] for k in seeds],
                                          [ref[k]["metrics"][s]["accuracy"] for k in seeds]) for s in splits}
    if not out:
        raise ValueError(f"--paired {reference}: no other row has two seeds or more, all with a {reference} run of the same seed")
    return out


def paired_markdown(diffs: dict[str, dict[str, dict]], reference: str) -> str:
    splits = list(next(iter(diffs.values())))
    head = ["method", "seeds"] + [s.replace("_", " ") for s in splits]
    lines = [f"ACC minus {reference}'s on the same seed: mean ± std of the per-seed differences [95% t-interval]", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, per_split in diffs.items():
        cells = [f"{d['mean']:+.2f}±{d['std']:.2f} [{d['low']:+.2f}, {d['high']:+.2f}]" for d in per_split.values()]
        lines.append(f"| {name} | {next(iter(per_split.values()))['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def point_labels(points: dict[str, tuple[float, float]]) -> dict[tuple[float, float], str]:
    """One label per distinct point: names whose points coincide (to 0.01) share it, joined
    by ", " in row order, so that collapsed runs do not print over each other."""
    labels: dict[tuple[float, float], list[str]] = {}
    for name, (x, y) in points.items():
        labels.setdefault((round(x, 2), round(y, 2)), []).append(name)
    return {xy: ", ".join(names) for xy, names in labels.items()}


def plot(summary: dict[str, dict], path: Path) -> None:
    """Two panels: forget ACC (x, lower is better) against retain ACC (y, higher is better)
    on train and on test; one labelled point per row, error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, side in zip(axes, ("train", "test")):
        for name, r in summary.items():
            (fx, fs), (ry, rs) = r[f"{side}_forget_accuracy"], r[f"{side}_retain_accuracy"]
            ax.errorbar(fx, ry, xerr=fs or None, yerr=rs or None, fmt="o", capsize=3)
        points = {name: (r[f"{side}_forget_accuracy"][0], r[f"{side}_retain_accuracy"][0]) for name, r in summary.items()}
        for (fx, ry), label in point_labels(points).items():
            ax.annotate(label, (fx, ry), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"{side} forget accuracy (%)  ← better")
        ax.set_ylabel(f"{side} retain accuracy (%)  ↑ better")
        ax.set_xlim(-5, 105)
        ax.grid(alpha=0.3)
    fig.suptitle("Forgetting vs utility")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mia_plot(summary: dict[str, dict], path: Path) -> None:
    """Forget-set MIA AUC (LOSS score, x) against test retain ACC (y), one point per row that
    has both, with the retrain oracle's AUC and 0.5 (chance) as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    points = {}
    for name, r in summary.items():
        if r.get("forget_loss_auc") is None or "test_retain_accuracy" not in r:
            continue
        (x, xs), (y, ys) = r["forget_loss_auc"], r["test_retain_accuracy"]
        ax.errorbar(x, y, xerr=xs or None, yerr=ys or None, fmt="o", capsize=3)
        points[name] = (x, y)
    for (x, y), label in point_labels(points).items():
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(0.5, color="grey", ls=":", lw=1, label="chance (0.5)")
    if "Retrain" in points:
        ax.axvline(points["Retrain"][0], color="green", ls="--", lw=1, label="retrain oracle")
    ax.set_xlabel("MIA AUC, train forget vs test forget (LOSS score); closer to the oracle is better")
    ax.set_ylabel("test retain accuracy (%)  ↑ better")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run or eval folders holding metrics.json")
    p.add_argument("--names", nargs="+", help="row names, one per folder (default: the folder name without -s<seed>)")
    p.add_argument("--markdown", help="also write the markdown table here")
    p.add_argument("--csv", help="also write the table as CSV here")
    p.add_argument("--plot", help="also write the forget-vs-retain trade-off plot (PNG) here")
    p.add_argument("--mia_plot", help="also write the MIA plot (forget-set MIA AUC against test retain ACC, PNG) here")
    p.add_argument("--spread", help="also print, and write here (markdown), how each split's ACC spreads over the seeds "
                                    "of every row with two or more: per-seed ACC, std, the std review-by-review chance "
                                    "alone would give, and the share of reviews with the same outcome on every seed "
                                    "(needs each run's records.jsonl and tokenizer)")
    p.add_argument("--paired", metavar="ROW", help="also print, for every other row whose seeds all have a ROW run of the "
                                                   "same seed, each split's ACC difference to ROW: mean and std of the "
                                                   "per-seed differences and a 95%% Student-t interval over the seeds "
                                                   "(ROW as printed, e.g. QLoRA, or a folder name without -s<seed>)")
    p.add_argument("--paired_markdown", metavar="F", help="also write the --paired table here (markdown)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.names and len(args.names) != len(args.runs):
        p.error("--names: give one name per run folder")
    if args.paired_markdown and not args.paired:
        p.error("--paired_markdown: give --paired ROW as well")
    for flag in ("markdown", "csv", "plot", "mia_plot", "spread", "paired_markdown"):  # output folders made (or refused) before any work
        out = getattr(args, flag)
        if out is None:
            continue
        try:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"error: --{flag} {out}: cannot create its folder ({e.strerror})", file=sys.stderr)
            return 2
        if Path(out).is_dir():
            print(f"error: --{flag} {out}: is a folder; give a file name", file=sys.stderr)
            return 2
    try:
        rows = collect(args.runs, args.names)
        add_audit(rows)
        splits = shown_splits(rows)
        spread = spreads(rows, splits) if args.spread else None
        if spread == {}:
            raise ValueError("--spread: no row has two seeds or more (run folders that differ only in -s<seed>)")
        reference = reference_row(rows, args.paired) if args.paired else None
        diffs = paired(rows, reference, splits) if reference else None
    except (FileNotFoundError, ValueError) as e:  # RunError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {name: summarise(runs, splits) for name, runs in rows.items()}
    table = markdown(summary)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.csv:
        write_csv(summary, Path(args.csv))
    if args.plot:
        plot(summary, Path(args.plot))
    if args.mia_plot:
        mia_plot(summary, Path(args.mia_plot))
    if spread is not None:
        text = spread_markdown(spread)
        print("\nseed spread:\n" + text)
        Path(args.spread).write_text(text + "\n")
    if diffs is not None:
        text = paired_markdown(diffs, reference)
        print("\n" + text)
        if args.paired_markdown:
            Path(args.paired_markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
