"""SPUL run folders: the frozen model a prompt is trained on, what the manifest binds the prompt
to, and rebuilding base + merged QLoRA + prompt from a manifest (the ``"spul"`` loader).

The frozen model is either a ``qlora.py`` run (base in full precision, LoRA merged: the paper's
setting) or a pre-trained model straight from ``--model_name`` (the published README's "avoid
loading and merging qlora parameters").
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from utils import guardrails
from utils.binding import BindingMismatch, tokenizer_fingerprint
from utils.cli import UsageError
from utils.loading import Loaded, LoadSource, load_source_or_base
from utils.models import DEFAULT_MODEL, load_tokenizer, resolve_model, weights_hash
from utils.prompt import ENCODER_FILE, PROMPT_DIR, join_prefix, load_encoder_weights, load_prompt, prompt_summary
from utils.runs import TOKENIZER_DIR, read_manifest, run_manifest, warn_if_oracle
from utils.splits import sha256_file

# what a SPUL manifest adds to utils.runs.run_manifest's
MANIFEST_FIELDS = ("source_kind", "qlora_run", "qlora_adapter_sha256", "qlora_splits", "tokenizer", "prompt",
                   "prompt_sha256", "prompt_encoder_sha256", "alpha", "beta", "generic_label_counts", "resumed_from",
                   "forced_mismatches", "hard_prefix")


def check_sources(model_checkpoints: str | None, model_name: str | None, resume_from: str | None, force: bool,
                  hard_prefix: str = "none") -> str:
    """Checks on --model_checkpoints, --model_name and --resume_from that need no model loaded:
    run kinds, a --model_name that contradicts the QLoRA run, a --resume_from prompt trained on
    another model or behind another --hard_prefix (unless --force). Returns the base model that
    will be used."""
    qlora = read_manifest(Path(model_checkpoints), "--model_checkpoints", ("qlora",)) if model_checkpoints else None
    warn_if_oracle(qlora, model_checkpoints)
    if qlora and model_name and resolve_model(model_name) != resolve_model(qlora["base_model"]):
        raise UsageError(
            f"--model_name {model_name}: conflicts with --model_checkpoints {model_checkpoints}, "
            f"which was fine-tuned from {qlora['base_model']}; pass only one of them"
        )
    model_name = qlora["base_model"] if qlora else (model_name or DEFAULT_MODEL)
    if not resume_from:
        return model_name
    old = read_manifest(Path(resume_from), "--resume_from", ("spul",))
    new = {
        "base_weights_sha256": qlora["base_weights_sha256"] if qlora else weights_hash(resolve_model(model_name)),
        "qlora_adapter_sha256": qlora["adapter_sha256"] if qlora else None,
    }
    differ = [k for k, v in new.items() if old.get(k) != v]
    if differ and not force:
        raise BindingMismatch(
            f"--resume_from {resume_from}: was trained on a different model ({', '.join(differ)} differ); "
            f"pass --force to use it anyway"
        )
    was = (old.get("hard_prefix") or {}).get("kind", "none")
    if was != hard_prefix and not force:
        raise UsageError(
            f"--resume_from {resume_from}: was trained with --hard_prefix {was}, this run asks for --hard_prefix "
            f"{hard_prefix} (the prompt learned to work behind its prefix); pass --force to use it anyway"
        )
    return model_name


def passes_guard(val_forget: float, bound: float) -> bool:
    """An attempt passes the guard when its val_forget ACC is at or under ``bound``."""
    return val_forget <= bound


def kept_attempt(val_forget: list[float], bound: float) -> int:
    """Which attempt a guarded run keeps, given each attempt's val_forget ACC: the first at or
    under ``bound``; if none is, the lowest (the earliest of equals)."""
    if not val_forget:
        raise ValueError("no attempt to choose from")
    for i, acc in enumerate(val_forget):
        if passes_guard(acc, bound):
            return i
    return min(range(len(val_forget)), key=lambda i: (val_forget[i], i))


def source_binding(model_checkpoints: str | None, source) -> dict:
    """Manifest fields naming the QLoRA run the prompt sits on (None for a pre-trained model)."""
    is_qlora = source.manifest.get("kind") == "qlora"
    return {
        "source_kind": source.manifest.get("kind"),
        "qlora_run": str(Path(model_checkpoints).resolve()) if is_qlora else None,
        "qlora_adapter_sha256": source.manifest.get("adapter_sha256") if is_qlora else None,
        "qlora_splits": source.manifest.get("splits") if is_qlora else None,
    }


def spul_manifest(data, splits, source, folder: Path, peft_model, tokenizer, *, model_checkpoints: str | None,
                  model_name: str, seed: int, threads: int | None, alpha: float, beta: float,
                  resume_from: str | None, forced: list, hard_prefix: dict | None = None,
                  generic_label: str | None = None, trained_seed: int | None = None) -> dict:
    """The manifest of a SPUL run: ``run_manifest`` plus the QLoRA run and its adapter hash,
    the tokenizer, the prompt's shape and hashes, the loss weights, how many forget samples
    drew each generic label, any mismatch accepted with --force, and the hard-text prefix
    (``--hard_prefix``: its kind and ``utils.guardrails.save_prefix``'s record) or None.
    ``seed`` is the run's (the one other stages of the same seed pair with); ``trained_seed``
    the kept attempt's under ``--restarts`` (default: ``seed``), which drew the generic labels."""
    return run_manifest(
        "spul", data, splits, model_name=model_name, model_path=source.model_path, seed=seed, threads=threads,
        **source_binding(model_checkpoints, source),
        tokenizer=tokenizer_fingerprint(tokenizer),
        prompt=prompt_summary(peft_model),
        prompt_sha256=weights_hash(folder / PROMPT_DIR),
        prompt_encoder_sha256=sha256_file(folder / ENCODER_FILE),
        alpha=alpha,
        beta=beta,
        generic_label_counts=dict(sorted(Counter(data.task.generic_for(len(splits["train_forget"]), seed if trained_seed is None else trained_seed, generic_label)).items())),
        resumed_from=str(Path(resume_from).resolve()) if resume_from else None,
        forced_mismatches=forced,
        hard_prefix=hard_prefix,
    )


def resume_encoder(peft_model, resume_from: str) -> None:
    """``--resume_from SPUL_RUN`` (checked by ``check_sources``): start from that run's encoder
    weights; p and h must be the same."""
    try:
        load_encoder_weights(peft_model, Path(resume_from))
    except (ValueError, OSError) as e:
        raise UsageError(f"--resume_from {resume_from}: {str(e).splitlines()[0]}") from e


def load_spul(run_dir: Path, manifest: dict, device, load_source: LoadSource) -> Loaded:
    """The ``"spul"`` loader: rebuild the frozen model the manifest names (QLoRA run merged into
    its base, or the pre-trained base) and attach the saved PEFT prompt, after the run's
    hard-text prefix if it has one (checked against its recorded hashes)."""
    tokenizer = load_tokenizer(Path(run_dir) / TOKENIZER_DIR)
    hard = manifest.get("hard_prefix")
    text = guardrails.read_prefix(run_dir, hard, tokenizer) if hard else None
    source = load_source_or_base(manifest, device, load_source)
    peft_model, prompt = load_prompt(source.model, run_dir)
    if text is not None:
        prompt = join_prefix(guardrails.prefix_embeddings(peft_model, tokenizer, text), prompt)
    return Loaded(peft_model, tokenizer, manifest, source.model_path, prompt=prompt)
