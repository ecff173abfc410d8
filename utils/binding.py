"""Binding run artefacts to the model they are loaded onto.

A manifest records the sha256 of what its artefacts were made with and of the artefacts
themselves: the base model's weights, the QLoRA adapter a prompt was trained on, the run's own
adapter or prompt. Before a run is loaded each recorded hash is recomputed from what the
manifest points to now; any difference is refused with one line, unless the caller forces it.
The checks are keyed by manifest field, so every kind of run gets the ones its manifest records.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from utils.models import ModelNotFound, resolve_model, weights_hash
from utils.prompt import ENCODER_FILE, PROMPT_DIR
from utils.runs import RunError
from utils.splits import sha256_file


class BindingMismatch(RunError):
    """A run's manifest does not match the model or files it would be loaded with."""


def _base_weights(run_dir: Path, manifest: dict) -> str:
    return weights_hash(resolve_model(manifest["base_model"]))


def _qlora_adapter(run_dir: Path, manifest: dict) -> str:
    return weights_hash(Path(manifest["qlora_run"]) / "adapter")


def _own_adapter(run_dir: Path, manifest: dict) -> str:
    return weights_hash(run_dir / "adapter")


def _prompt(run_dir: Path, manifest: dict) -> str:
    return weights_hash(run_dir / PROMPT_DIR)


def _prompt_encoder(run_dir: Path, manifest: dict) -> str:
    return sha256_file(run_dir / ENCODER_FILE)


# manifest field -> (what it names, how to recompute it from what the manifest points to now)
CHECKS = {
    "base_weights_sha256": ("base model weights", _base_weights),
    "qlora_adapter_sha256": ("QLoRA adapter", _qlora_adapter),
    "adapter_sha256": ("adapter", _own_adapter),
    "prompt_sha256": ("prompt adapter", _prompt),
    "prompt_encoder_sha256": ("prompt encoder", _prompt_encoder),
}



def tokenizer_fingerprint(tokenizer) -> dict:
    """Name and a sha256 of the vocabulary, special tokens and padding side."""
    content = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "pad_token_id": tokenizer.pad_token_id,
        "padding_side": tokenizer.padding_side,
    }
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False).encode()
    return {"name_or_path": str(tokenizer.name_or_path), "sha256": hashlib.sha256(blob).hexdigest(), "vocab_size": len(tokenizer)}


def mismatches(run_dir: Path, manifest: dict) -> list[str]:
    """One short description per recorded hash that differs from what the manifest points to
    now. A target that is gone is skipped here: loading it fails with its own error, and a run
    that keeps its own copy (a baseline) does not need it."""
    found = []
    for key, (what, current) in CHECKS.items():
        recorded = manifest.get(key)
        if not recorded:
            continue
        try:
            now = current(Path(run_dir), manifest)
        except (OSError, ModelNotFound, KeyError, TypeError):
            continue
        if now != recorded:
            found.append(f"{what} sha256 is {now[:12]}, the manifest records {recorded[:12]}")
    return found


def check_binding(run_dir, manifest: dict, force: bool, flag: str = "--model_checkpoints") -> list[str]:
    """Raise BindingMismatch (one line) on any mismatch, or with ``force`` print one warning
    line and return the mismatches."""
    found = mismatches(Path(run_dir), manifest)
    if found and not force:
        raise BindingMismatch(
            f"{flag} {run_dir}: does not match the model it would be loaded onto ({'; '.join(found)}); "
            f"pass --force to load it anyway"
        )
    if found:
        print(f"warning: {flag} {run_dir}: loading despite ({'; '.join(found)}) because of --force", file=sys.stderr)
    return found
