"""Forward passes that compute logits only where they are needed: at the positions that
predict the label tokens, optionally with soft-prompt embeddings prepended.

Running the backbone and applying the LM head to the gathered hidden states costs
B*K*V instead of B*L*V for the output layer, and never materialises full logits.
"""
from __future__ import annotations

import torch


def unwrap(model):
    """The causal LM inside a PEFT wrapper (LoRA layers stay injected), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone(model):
    """The transformer stack that returns ``last_hidden_state`` (``model.base_model``)."""
    return unwrap(model).base_model


def gather_label_logits(logits: torch.Tensor, label_pos: torch.Tensor, num_virtual: int = 0) -> torch.Tensor:
    """From full logits (B, p+L, V) take (B, K, V) at the label-predicting positions.
    ``label_pos`` indexes the text tokens, so ``num_virtual`` prompt tokens shift it."""
    idx = (label_pos + num_virtual).unsqueeze(-1).expand(-1, -1, logits.size(-1))
    return logits.gather(1, idx)


def _with_prompt(model, batch, prompt):
    embeds = unwrap(model).get_input_embeddings()(batch["input_ids"])
    mask = batch["attention_mask"]
    if prompt is None:
        return embeds, mask, 0
    prompt = prompt.to(embeds.dtype)
    if prompt.dim() == 2:
        prompt = prompt.unsqueeze(0).expand(embeds.size(0), -1, -1)
    p = prompt.size(1)
    mask = torch.cat([mask.new_ones(mask.size(0), p), mask], dim=1)
    return torch.cat([prompt, embeds], dim=1), mask, p


def label_hidden(model, batch, prompt=None) -> torch.Tensor:
    """Hidden states (B, K, d) at the label-predicting positions."""
    embeds, mask, p = _with_prompt(model, batch, prompt)
    out = backbone(model)(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
    hidden = out.last_hidden_state
    idx = (batch["label_pos"] + p).unsqueeze(-1).expand(-1, -1, hidden.size(-1))
    return hidden.gather(1, idx)


def label_logits(model, batch, prompt=None) -> torch.Tensor:
    """Logits (B, K, V) over the whole vocabulary at the label-predicting positions, in fp32."""
    head = unwrap(model).get_output_embeddings()
    return head(label_hidden(model, batch, prompt)).float()


def full_logits_at_labels(model, batch, prompt=None) -> torch.Tensor:
    """The naive path: full (B, p+L, V) logits from the model's own forward, then gathered.
    Kept as the reference that ``label_logits`` must match, and for benchmarks."""
    embeds, mask, p = _with_prompt(model, batch, prompt)
    logits = unwrap(model)(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
    return gather_label_logits(logits, batch["label_pos"], p).float()


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
