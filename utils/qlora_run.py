"""The QLoRA run kind (``qlora.py``): its loss and how its run folder loads.

A QLoRA run folder holds the LoRA adapter trained on the 4-bit base; it is loaded as the base
in full precision with the adapter merged in, as the paper does before unlearning.
"""
from __future__ import annotations

from pathlib import Path

from utils.forward import label_logits
from utils.loading import Loaded, LoadSource, load_merged
from utils.losses import batch_mean, ce_per_sample, global_count
from utils.models import load_tokenizer
from utils.runs import TOKENIZER_DIR

ADAPTER_DIR = "adapter"


def label_ce(model, batch):
    """Cross-entropy on the label token(s) only, averaged per sample then over the batch (over
    the whole optimiser step with ``batch["global_counts"]``)."""
    loss = batch_mean(ce_per_sample(label_logits(model, batch), batch["label_ids"]), global_count(batch, "all"))
    return loss, {"ce": loss.item()}


label_ce.global_counts = True  # utils.training.train: normalised by the step's sample count


def load_qlora(run_dir: Path, manifest: dict, device, load_source: LoadSource) -> Loaded:
    """Base model in full precision with the QLoRA adapter merged in."""
    model, model_path = load_merged(manifest["base_model"], [Path(run_dir) / ADAPTER_DIR], device)
    return Loaded(model.eval(), load_tokenizer(Path(run_dir) / TOKENIZER_DIR), manifest, model_path)


def display(manifest: dict) -> str:
    return "Retrain" if manifest.get("retain_only") else "QLoRA"
