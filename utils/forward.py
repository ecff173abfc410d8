"""Forward passes that compute logits only where they are needed: at the positions that
predict the label tokens, optionally with soft-prompt embeddings prepended.

Running the backbone and applying the LM head to the gathered hidden states costs
B*K*V instead of B*L*V for the output layer, and never materialises full logits.

A soft prompt does not depend on the input, so ``PromptCache`` computes its key/value cache
once and every batch then runs only its own tokens (inference, and the SPUL training step).
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


class PromptCache:
    """The key/value cache of a soft prompt, computed once and reused for every batch.

    The prompt sits in front of every input and attends only to itself (causal attention), so
    its keys and values in every layer do not depend on the input: one forward of the p prompt
    embeddings (batch 1) gives them. Each batch then runs only its own L tokens, at positions
    p..p+L-1, attending to the cached prompt (mask: ones for the p prompt positions, then the
    batch mask). Built under no_grad/inference_mode it serves evaluation; built with grad (the
    training prompt) the gradient flows back through the cache into the prompt, and the prompt
    positions are computed once per step instead of once per row.

    The stored per-layer tensors are never handed to the model: ``for_batch`` wraps views of
    them (expanded to the batch size) in a fresh ``DynamicCache`` whose ``update`` concatenates
    into new tensors, so no batch can change what the next one sees.
    """

    def __init__(self, layers, length: int, config):
        self.layers = layers  # [(keys, values)], each (1, kv_heads, p, head_dim)
        self.length = length
        self.config = config

    @classmethod
    def build(cls, model, prompt: torch.Tensor, past: "PromptCache | None" = None) -> "PromptCache":
        """One forward of the (p, d) prompt embeddings (batch 1) with ``use_cache=True``.

        With ``past`` (the cache of q fixed rows that come first, e.g. a hard-text prefix) only
        the p new rows run, at positions q..q+p-1, attending to ``past``: the result holds all
        q + p positions, as one build of the joined rows would (same values up to float
        rounding), and the gradient reaches ``prompt`` only, for p instead of q + p positions."""
        _check_cache_compatible(model)
        embed = unwrap(model).get_input_embeddings()
        prompt = prompt.to(embed.weight.dtype)
        if prompt.dim() == 3:  # (1, p, d)
            prompt = prompt[0]
        p, q = prompt.size(0), (past.length if past is not None else 0)
        mask = torch.ones(1, q + p, dtype=torch.long, device=prompt.device)
        extra = {}
        if past is not None:
            extra = {"past_key_values": past.for_batch(1),
                     "position_ids": torch.arange(q, q + p, device=prompt.device).unsqueeze(0)}
        out = backbone(model)(inputs_embeds=prompt.unsqueeze(0), attention_mask=mask, use_cache=True, **extra)
        layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return cls(layers, q + p, unwrap(model).config)

    def for_batch(self, batch_size: int):
        """A fresh ``DynamicCache`` holding the prompt for ``batch_size`` rows."""
        from transformers import DynamicCache

        data = [(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in self.layers]
        return DynamicCache(ddp_cache_data=data, config=self.config)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.layers for t in kv)


def cache_compatible(model) -> bool:
    """False while the model trains with activation checkpointing, whose layers drop any
    ``past_key_values`` (the prompt must then be prepended instead)."""
    return not (model.training and any(getattr(m, "gradient_checkpointing", False) for m in backbone(model).modules()))


def _check_cache_compatible(model) -> None:
    if not cache_compatible(model):
        raise ValueError("a prompt cache cannot be used while the model trains with activation checkpointing")


def _cached_hidden(model, batch, cache: PromptCache) -> torch.Tensor:
    """Last hidden states (B, L, d) of the text tokens, run after the cached prompt."""
    _check_cache_compatible(model)
    ids, text_mask = batch["input_ids"], batch["attention_mask"]
    B, L = ids.shape
    p = cache.length
    mask = torch.cat([text_mask.new_ones(B, p), text_mask], dim=1)
    positions = torch.arange(p, p + L, device=ids.device).unsqueeze(0).expand(B, -1)
    embeds = unwrap(model).get_input_embeddings()(ids)
    out = backbone(model)(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                          past_key_values=cache.for_batch(B), use_cache=True)
    return out.last_hidden_state


def label_hidden(model, batch, prompt=None, prompt_cache: PromptCache | None = None) -> torch.Tensor:
    """Hidden states (B, K, d) at the label-predicting positions. With ``prompt_cache`` the
    prompt comes from the cache (``prompt`` must then be None) and only the text tokens run."""
    if prompt_cache is not None:
        if prompt is not None:
            raise ValueError("pass either prompt or prompt_cache, not both")
        hidden, p = _cached_hidden(model, batch, prompt_cache), 0  # hidden holds the text positions only
    else:
        embeds, mask, p = _with_prompt(model, batch, prompt)
        hidden = backbone(model)(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    idx = (batch["label_pos"] + p).unsqueeze(-1).expand(-1, -1, hidden.size(-1))
    return hidden.gather(1, idx)


def label_logits(model, batch, prompt=None, prompt_cache: PromptCache | None = None) -> torch.Tensor:
    """Logits (B, K, V) over the whole vocabulary at the label-predicting positions, in fp32."""
    return head_logits(model, label_hidden(model, batch, prompt, prompt_cache))


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer on ``hidden`` (..., d), in fp32."""
    return unwrap(model).get_output_embeddings()(hidden).float()


def full_logits_at_labels(model, batch, prompt=None) -> torch.Tensor:
    """The naive path: full (B, p+L, V) logits from the model's own forward, then gathered.
    Kept as the reference that ``label_logits`` must match, and for benchmarks."""
    embeds, mask, p = _with_prompt(model, batch, prompt)
    logits = unwrap(model)(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
    return gather_label_logits(logits, batch["label_pos"], p).float()


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
