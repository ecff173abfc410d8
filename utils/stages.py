"""Run a recipe's stages in one Python process (``ONE_PROCESS=1`` in ``scripts/common.sh``).

Each stage of a recipe is one entry point's command line (``qlora.py``, ``spul.py``,
``baselines.py``, ``inference_spul.py``, or ``-m utils.report`` / ``utils.select`` /
``utils.relearn`` / ``utils.probes``). Run as its own process, every stage imports torch,
transformers, peft and accelerate again (about 9 s on the 2-core CPU machine); here the
libraries load once and each stage calls its entry point's ``main(argv)``.

The stages behave as they do as processes: each seeds itself (``--seed``), and the thread
count, the environment and the working directory are restored after every stage, so a stage
writes the same ``metrics.json`` either way (tested). A stage that exits with a non-zero status
(a user error's one line, a diverged run) stops the plan with the same message as
``scripts/common.sh``'s stage runner, and later stages do not run.

The plan file is written by ``scripts/common.sh``: per stage, its name, its run folder or done
marker, then its argv (the interpreter first), each field followed by a NUL byte and the record
by a newline.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SCRIPTS = {"qlora.py": "qlora", "spul.py": "spul", "baselines.py": "baselines", "inference_spul.py": "inference_spul"}
MODULES = ("utils.report", "utils.select", "utils.relearn", "utils.probes")


class PlanError(ValueError):
    """A plan that names something this runner cannot call."""


@dataclass(frozen=True)
class Stage:
    name: str
    done: str  # the run folder (finished once it holds metrics.json) or the .json marker
    argv: tuple[str, ...]  # the command line, the interpreter first

    def finished(self) -> bool:
        marker = Path(self.done) if self.done.endswith(".json") else Path(self.done) / "metrics.json"
        return marker.is_file()

    def target(self) -> tuple[str, list[str]]:
        """(module to import, its argv) for the command line."""
        args = list(self.argv[1:])
        if args[:1] == ["-m"] and len(args) > 1 and args[1] in MODULES:
            return args[1], args[2:]
        if args and Path(args[0]).name in SCRIPTS and Path(args[0]).parent in (Path("."), Path("")):
            return SCRIPTS[Path(args[0]).name], args[1:]
        raise PlanError(f"stage '{self.name}': cannot run '{' '.join(self.argv[:3])}' in one process "
                        f"(entry points: {', '.join(SCRIPTS)}; modules: {', '.join(MODULES)})")


def read_plan(path: Path) -> list[Stage]:
    stages = []
    for record in path.read_bytes().split(b"\0\n"):
        if not record:
            continue
        fields = [f.decode() for f in record.split(b"\0")]
        if len(fields) < 3:
            raise PlanError(f"{path}: a stage record needs a name, a folder and a command")
        stages.append(Stage(fields[0], fields[1], tuple(fields[2:])))
    return stages


def run_stage(stage: Stage) -> int:
    """Call the stage's entry point in this process; its exit status (0 on success)."""
    module, argv = stage.target()
    threads, environ, cwd = torch.get_num_threads(), dict(os.environ), os.getcwd()
    try:
        importlib.import_module(module).main(argv)
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        gc.collect()


def run_plan(stages: list[Stage], out=sys.stdout) -> int:
    for stage in stages:
        stage.target()  # every stage checked before the first one runs
    for stage in stages:
        if stage.finished():
            print(f"[{stage.name}] reusing {stage.done.removesuffix('/metrics.json')}", file=out, flush=True)
            continue
        print(f"[{stage.name}] {time.strftime('%H:%M:%S')} {' '.join(stage.argv)}", file=out, flush=True)
        t0 = time.monotonic()
        status = run_stage(stage)
        if status != 0:
            print(f"error: stage '{stage.name}' failed (command above); later stages not run", file=sys.stderr)
            return 1
        print(f"[{stage.name}] done in {int(time.monotonic() - t0)} s", file=out, flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan", type=Path, help="the plan file written by scripts/common.sh (ONE_PROCESS=1)")
    args = p.parse_args(argv)
    if not args.plan.is_file():
        print(f"error: plan {args.plan}: no such file", file=sys.stderr)
        return 2
    try:
        return run_plan(read_plan(args.plan))
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
