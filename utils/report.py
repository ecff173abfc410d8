"""Collect run folders into the paper's table layout (ACC / F1 on the four splits).

    python -m utils.report RUN [RUN ...] [--names NAME ...] [--markdown FILE] [--csv FILE]
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from utils.data import SPLITS
from utils.evaluation import format_table
from utils.runs import METRICS, read_json


def collect(run_dirs, names=None) -> dict[str, dict]:
    """{row name: metrics} from each folder's metrics.json (name defaults to the folder)."""
    names = names or [Path(d).name for d in run_dirs]
    rows = {}
    for name, d in zip(names, run_dirs):
        path = Path(d) / METRICS
        if not path.is_file():
            raise FileNotFoundError(f"{d}: no {METRICS} (not a finished run)")
        rows[name] = read_json(path)
    return rows


def write_csv(rows: dict[str, dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method"] + [f"{s}_{m}" for s in SPLITS for m in ("acc", "f1")])
        for name, res in rows.items():
            w.writerow([name] + [f"{res[s][m]:.2f}" for s in SPLITS for m in ("accuracy", "f1")])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run or eval folders holding metrics.json")
    p.add_argument("--names", nargs="+", help="row names, one per folder (default: folder names)")
    p.add_argument("--markdown", help="also write the markdown table here")
    p.add_argument("--csv", help="also write the table as CSV here")
    args = p.parse_args(argv)
    if args.names and len(args.names) != len(args.runs):
        p.error("--names: give one name per run folder")
    try:
        rows = collect(args.runs, args.names)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = format_table(rows)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.csv:
        write_csv(rows, Path(args.csv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
