"""What loading a run folder gives (``Loaded``) and the two models every kind starts from: a
pre-trained model straight from ``--model_name`` (the paper's "Vanilla" row) and a base model
with a LoRA adapter merged in.

Loaders of run kinds (``utils.kinds``) build on these. A kind whose run sits on another run (a
SPUL prompt on a QLoRA run) receives the registry's ``load_run`` as its ``load_source``
argument, so that no kind module imports the registry that imports it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from utils.models import load_model, load_tokenizer, merge_lora, resolve_model


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    manifest: dict
    model_path: str  # the base model the run started from
    prompt: torch.Tensor | None = None  # soft-prompt embeddings (p, d), if the run has one
    # an input filter (utils.guardrails.NameFilter: .hits(texts), .label), if the run has one
    input_filter: object | None = None


# (run_dir, device, flag, kinds) -> Loaded: the registry's load_run, handed to loaders
LoadSource = Callable[..., Loaded]


def load_pretrained(model_name: str, device, set_pad_id: bool = False) -> Loaded:
    """A model straight from --model_name, full precision."""
    model_path = resolve_model(model_name)
    model, _ = load_model(model_path, device, quantize=False)
    manifest = {"kind": "vanilla", "base_model": model_name}
    return Loaded(model.eval(), load_tokenizer(model_path, set_pad_id), manifest, model_path)


def load_merged(model_name: str, adapters, device, tokenizer=None) -> tuple[torch.nn.Module, str]:
    """``model_name``'s base in full precision with each adapter folder of ``adapters`` merged
    in, in order (as the paper does for QLoRA). Returns (model, resolved base path)."""
    model_path = resolve_model(model_name)
    model, _ = load_model(model_path, device, quantize=False, tokenizer=tokenizer)
    for adapter in adapters:
        model = merge_lora(model, Path(adapter))
    return model.to(device), model_path


def load_source_or_base(manifest: dict, device, load_source: LoadSource) -> Loaded:
    """The model a run was made on: the QLoRA run its manifest names (merged), or its base
    model straight from the hub or disk."""
    qlora = manifest.get("qlora_run")
    if qlora:
        return load_source(qlora, device, "qlora_run (in the manifest)", ("qlora",))
    return load_pretrained(manifest["base_model"], device)
