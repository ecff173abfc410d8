"""Run folders: created in a temporary sibling and renamed into place only when complete,
never overwritten without ``--overwrite``, holding JSON (config, metrics, manifest) and
safetensors weights."""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from utils.data import split_fingerprint
from utils.invariant import strict_blas
from utils.models import weights_hash

MANIFEST = "manifest.json"
CONFIG = "config.json"
METRICS = "metrics.json"
RECORDS = "records.jsonl"  # one JSON object per evaluated example (utils.evaluation.example_records)
AUDIT = "audit.json"  # membership-inference AUCs (utils.mia)
TOKENIZER_DIR = "tokenizer"  # the tokenizer a run saved beside its weights


class RunError(ValueError):
    """A run folder problem; the message is one line naming the flag or folder."""


def default_run_name(*parts: str) -> str:
    """A folder name from its parts (model, dataset, ...), safe for any file system."""
    clean = [str(p).rstrip("/").replace("/", "_").replace(" ", "_") for p in parts if p]
    return "-".join(clean)


def check_output(path: Path, overwrite: bool, flag: str = "--output_path") -> None:
    if path.exists() and not overwrite:
        raise RunError(f"{flag} {path}: already exists (pass --overwrite to replace it)")


@contextmanager
def atomic_run_dir(path: Path, overwrite: bool = False):
    """Yield a temporary folder; on success it replaces ``path``, on any error it is removed."""
    path = Path(path)
    check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def library_versions() -> dict:
    """Library versions and the machine: float results depend on the CPU's kernels (torch's
    vector ISA level) as they do on the thread count, so a run records both."""
    import importlib.metadata as md

    import torch

    out = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu": cpu_name(),
           "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def read_manifest(run_dir: Path, flag: str = "--model_checkpoints", kinds: tuple[str, ...] | None = None) -> dict:
    """The manifest of a finished run; checks that the folder is a run of an expected kind."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{flag} {run_dir}: no such folder")
    if not (run_dir / MANIFEST).is_file():
        raise RunError(f"{flag} {run_dir}: not a run folder of this toolkit (no {MANIFEST})")
    manifest = read_json(run_dir / MANIFEST)
    if kinds is not None and manifest.get("kind") not in kinds:
        raise RunError(
            f"{flag} {run_dir}: is a '{manifest.get('kind')}' run, expected {' or '.join(kinds)}"
        )
    return manifest


def trained_run(run_dir) -> Path:
    """The run an eval folder (``inference_spul.py``) evaluated, else ``run_dir`` itself."""
    manifest = read_json(Path(run_dir) / MANIFEST)
    return Path(manifest["source"]) if manifest.get("kind") == "eval" else Path(run_dir)


def warn_if_oracle(manifest: dict | None, run_dir, flag: str = "--model_checkpoints") -> None:
    """One warning line when an unlearning run starts from a retrain oracle (qlora.py
    --retain_only), which never saw the forget set: there is nothing to unlearn."""
    if manifest and manifest.get("retain_only"):
        print(f"warning: {flag} {run_dir}: a retrain oracle (trained without the forget set); unlearning it "
              f"measures nothing (unlearn the QLoRA run trained on train_retain + train_forget)", file=sys.stderr)


def run_manifest(kind: str, data, splits: dict, *, model_name: str, model_path: str, seed: int, threads: int | None,
                 **extra) -> dict:
    """What binds a run's artefacts to the model, data (a ``utils.data.DataConfig``), task and
    code they came from."""
    return {
        "kind": kind,
        "base_model": model_name,
        "base_model_path": str(model_path),
        "base_weights_sha256": weights_hash(model_path),
        **data.task.manifest(),
        "dataset": data.dataset,
        "data_dir": data.data_dir,
        "forget_size": data.forget_size,
        "seed": seed,
        "data_seed": data.data_seed,
        "val_fraction": data.val_fraction,
        "threads": threads,
        "blas": strict_blas(),
        "splits": split_fingerprint(splits),
        "versions": library_versions(),
        **extra,
    }


def save_run(tmp: Path, config: dict, evaluation, manifest: dict, stats: dict | None = None) -> None:
    """The files every run folder has: config, metrics, manifest (and train stats), from a
    ``utils.evaluation.Evaluation``; with per-example records also ``records.jsonl`` (one JSON
    object per evaluated example) and ``audit.json`` (the membership-inference AUCs). ``config``:
    the resolved flags (``vars(args)``)."""
    write_json(tmp / CONFIG, config)
    write_json(tmp / METRICS, evaluation.metrics)
    write_json(tmp / MANIFEST, manifest)
    if stats is not None:
        write_json(tmp / "train_stats.json", stats)
    if evaluation.records:
        with open(tmp / RECORDS, "w") as f:
            for r in evaluation.records:
                f.write(json.dumps(r) + "\n")
        write_json(tmp / AUDIT, {"mia": evaluation.mia, "records": RECORDS, "examples": len(evaluation.records)})


def read_records(run_dir: Path) -> list[dict]:
    """The per-example records of a run folder (``records.jsonl``)."""
    path = Path(run_dir) / RECORDS
    if not path.is_file():
        raise RunError(f"{run_dir}: no {RECORDS} (evaluated before per-example records existed, or by --protocol generate)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
