"""Rebuild an evaluable model from a run folder, chosen by the ``kind`` in its manifest.

Each kind registers a loader ``(run_dir, manifest, device) -> Loaded``; ``inference_spul.py``
and the unlearning scripts call ``load_run`` and never branch on the kind themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from utils.models import load_model, load_tokenizer, merge_lora, resolve_model, short_reason
from utils.baselines import load_baseline
from utils.runs import RunError, read_manifest
from utils.spul_run import load_spul


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    manifest: dict
    model_path: str  # the base model the run started from
    prompt: torch.Tensor | None = None  # soft-prompt embeddings (p, d), if the run has one


def load_qlora(run_dir: Path, manifest: dict, device) -> Loaded:
    """Base model in full precision with the QLoRA adapter merged in (as the paper does)."""
    model_path = resolve_model(manifest["base_model"])
    model, _ = load_model(model_path, device, quantize=False)
    model = merge_lora(model, run_dir / "adapter").to(device)
    return Loaded(model.eval(), load_tokenizer(run_dir / "tokenizer"), manifest, model_path)


LOADERS = {"qlora": load_qlora, "baseline": load_baseline, "spul": load_spul}


def load_run(run_dir, device, flag: str = "--model_checkpoints", kinds: tuple[str, ...] | None = None) -> Loaded:
    manifest = read_manifest(Path(run_dir), flag, kinds or tuple(LOADERS))
    return LOADERS[manifest["kind"]](Path(run_dir), manifest, device)


def read_run_tokenizer(run, flag: str = "RUN") -> tuple[dict, object]:
    """A finished run folder's manifest (of a loadable kind) and tokenizer, without loading any
    model: for the checks a command makes before it loads one. One-line errors name ``flag``."""
    manifest = read_manifest(Path(run), flag, tuple(LOADERS))
    path = Path(run) / "tokenizer"
    if not path.is_dir():
        raise RunError(f"{flag} {run}: has no tokenizer/ folder (an incomplete run?)")
    try:
        return manifest, load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise RunError(f"{flag} {run}: cannot load its tokenizer ({short_reason(e)})") from e


def load_pretrained(model_name: str, device, set_pad_id: bool = False) -> Loaded:
    """A model straight from --model_name (the paper's 'Vanilla' row), full precision."""
    model_path = resolve_model(model_name)
    model, _ = load_model(model_path, device, quantize=False)
    manifest = {"kind": "vanilla", "base_model": model_name}
    return Loaded(model.eval(), load_tokenizer(model_path, set_pad_id), manifest, model_path)
