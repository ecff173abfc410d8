"""The registry of run kinds: every kind of run folder the toolkit writes, what makes it, how it
loads, and how the report names it. ``inference_spul.py``, the unlearning scripts, the report
and the selection read this registry and never branch on a kind themselves.

A kind's own module (``utils.qlora_run``, ``utils.spul_run``, ``utils.baselines``) holds its
loss, its training features and its loader ``(run_dir, manifest, device, load_source) ->
Loaded``. This module imports them; they never import it: a run that sits on another run gets
``load_run`` passed in as ``load_source``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from utils import baselines, qlora_run, spul_run
from utils.binding import check_binding
from utils.loading import Loaded
from utils.models import load_tokenizer, short_reason
from utils.runs import TOKENIZER_DIR, RunError, read_manifest


@dataclass(frozen=True)
class RunKind:
    name: str  # the manifest's "kind"
    made_by: str  # the entry point that writes it
    load: Callable  # (run_dir, manifest, device, load_source) -> Loaded
    display: Callable[[dict], str]  # manifest -> the report's row name
    manifest_fields: tuple[str, ...]  # what its manifest adds to utils.runs.run_manifest's


KINDS: dict[str, RunKind] = {
    "qlora": RunKind("qlora", "qlora.py", qlora_run.load_qlora, qlora_run.display,
                     ("quantized", "adapter_sha256", "lora_target_modules", "retain_only")),
    "spul": RunKind("spul", "spul.py", spul_run.load_spul, lambda m: "SPUL", spul_run.MANIFEST_FIELDS),
    "baseline": RunKind("baseline", "baselines.py", baselines.load_baseline, baselines.display, baselines.MANIFEST_FIELDS),
}


def load_run(run_dir, device, flag: str = "--model_checkpoints", kinds: tuple[str, ...] | None = None) -> Loaded:
    """The evaluable model of a run folder, by the kind its manifest records."""
    manifest = read_manifest(Path(run_dir), flag, kinds or tuple(KINDS))
    return KINDS[manifest["kind"]].load(Path(run_dir), manifest, device, load_run)


def load_checked(run_dir, device, force: bool = False, flag: str = "--model_checkpoints", kinds=None):
    """``load_run`` after ``utils.binding.check_binding``. Returns (Loaded, mismatches)."""
    manifest = read_manifest(Path(run_dir), flag, kinds or tuple(KINDS))
    found = check_binding(run_dir, manifest, force, flag)
    return load_run(run_dir, device, flag, kinds), found


def read_run_tokenizer(run, flag: str = "RUN") -> tuple[dict, object]:
    """A finished run folder's manifest (of a loadable kind) and tokenizer, without loading any
    model: for the checks a command makes before it loads one. One-line errors name ``flag``."""
    manifest = read_manifest(Path(run), flag, tuple(KINDS))
    path = Path(run) / TOKENIZER_DIR
    if not path.is_dir():
        raise RunError(f"{flag} {run}: has no tokenizer/ folder (an incomplete run?)")
    try:
        return manifest, load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise RunError(f"{flag} {run}: cannot load its tokenizer ({short_reason(e)})") from e


def display_name(manifest: dict) -> str:
    """The report's name for a run: its kind's, or "Vanilla" for a pre-trained model."""
    kind = KINDS.get(manifest.get("kind"))
    return kind.display(manifest) if kind else "Vanilla"
