"""The SPUL soft prompt: P-tuning (PEFT ``PromptEncoderConfig``, MLP reparameterisation) on a
frozen causal LM. Building it, the prompt embeddings (p, d) that ``utils.forward`` prepends,
saving, reloading for inference, and reloading the encoder to resume training.

A run folder holds the prompt twice:

- ``prompt/``: the PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors`` with
  ``prompt_embeddings`` (p, d), the encoder's output). Enough for inference; loads with
  ``peft.PeftModel.from_pretrained``.
- ``prompt_encoder.safetensors``: the encoder's own weights (embedding table + MLP). The PEFT
  save keeps only the final embeddings, so training resumes from this file.
"""
from __future__ import annotations

from pathlib import Path

import torch

from utils.invariant import on_one_thread, one_thread

ADAPTER = "default"  # PEFT's adapter name; prompt learning supports one adapter per model
PROMPT_DIR = "prompt"
ENCODER_FILE = "prompt_encoder.safetensors"


def prompt_config(num_tokens: int, hidden_size: int):
    """P-tuning config of the paper: MLP reparameterisation, ``encoder_hidden_size`` = h."""
    from peft import PromptEncoderConfig, TaskType

    return PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=num_tokens,
        encoder_reparameterization_type="MLP",
        encoder_hidden_size=hidden_size,
    )


PROMPT_NORMS = ("free", "token")  # --prompt_norm choices


def token_embedding_norm(model) -> float:
    """Mean L2 norm of the rows of the model's input embedding table."""
    weight = model.get_input_embeddings().weight
    return float(weight.detach().float().norm(dim=-1).mean())


def add_prompt(model, num_tokens: int, hidden_size: int, seed: int, row_norm: float | None = None):
    """Wrap ``model`` in a PEFT P-tuning model. The model's own weights are frozen; only the
    prompt encoder trains. Its initialisation is seeded without touching the global RNG.

    With ``row_norm`` every row of the encoder's output is rescaled to that L2 norm (a forward
    hook on the encoder, so its weights and PEFT's saved ``prompt_embeddings`` are as usual):
    the prompt tokens keep the scale of real token embeddings instead of drifting far above it,
    which makes training at CPU-scale learning rates chaotic (see the README)."""
    from peft import get_peft_model

    for param in model.parameters():
        param.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, prompt_config(num_tokens, hidden_size))
    if row_norm is not None:
        if not row_norm > 0:
            raise ValueError(f"row_norm {row_norm}: must be positive")

        def rescale(module, inputs, out, norm=float(row_norm)):
            return norm * torch.nn.functional.normalize(out, dim=-1)

        prompt_encoder(peft_model).register_forward_hook(rescale)
    return peft_model


def prompt_encoder(peft_model) -> torch.nn.Module:
    return peft_model.prompt_encoder[ADAPTER]


def trainable_parameters(peft_model) -> list[torch.nn.Parameter]:
    return [p for p in prompt_encoder(peft_model).parameters() if p.requires_grad]


def prompt_embeddings(peft_model) -> torch.Tensor:
    """The (p, d) prompt embeddings: the encoder's output while training (with grad), the
    stored embeddings of a loaded adapter in inference mode. PEFT's own forward prepends
    exactly these (``get_prompt``). The encoder runs on one CPU thread, forward and backward
    (``utils.invariant.on_one_thread``), so the prompt does not depend on ``--threads``."""
    return on_one_thread(lambda: peft_model.get_prompt(batch_size=1)[0], trainable_parameters(peft_model),
                         _encoder_device(peft_model))


def _encoder_device(peft_model) -> torch.device:
    return next(prompt_encoder(peft_model).parameters(), torch.empty(0)).device


def with_hard_prefix(prompt_fn, fixed: torch.Tensor | None):
    """``prompt_fn`` (model -> (p, d) soft prompt) preceded by the fixed (q, d) embeddings of a
    hard-text prefix (``spul.py --hard_prefix``): model -> (q + p, d), the prefix first, so that
    the soft tokens attend to it. ``fixed`` None: ``prompt_fn`` itself."""
    if fixed is None:
        return prompt_fn
    return lambda model: join_prefix(fixed, prompt_fn(model))


def join_prefix(fixed: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """(q + p, d): the fixed prefix rows, then the soft prompt's (in the soft prompt's device and dtype)."""
    return torch.cat([fixed.to(soft.device, soft.dtype), soft], dim=0)


def save_prompt(peft_model, folder: Path) -> None:
    """Write ``prompt/`` (PEFT adapter) and ``prompt_encoder.safetensors`` into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with one_thread(_encoder_device(peft_model)):  # PEFT runs the encoder to store its output
        peft_model.save_pretrained(folder / PROMPT_DIR)
    state = {k: v.detach().cpu().contiguous() for k, v in prompt_encoder(peft_model).state_dict().items()}
    save_file(state, folder / ENCODER_FILE)


def load_prompt(model, folder: Path):
    """Attach the saved PEFT adapter to ``model`` for inference. Returns (peft_model, prompt)
    with ``prompt`` the stored (p, d) embeddings, detached."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(Path(folder) / PROMPT_DIR), is_trainable=False)
    with torch.no_grad():
        prompt = prompt_embeddings(peft_model).detach()
    return peft_model.eval(), prompt


def load_encoder_weights(peft_model, folder: Path) -> None:
    """Resume: load a saved encoder (embedding + MLP) into a trainable prompt model built with
    the same p and h. Shapes that differ raise ValueError naming the file."""
    from safetensors.torch import load_file

    path = Path(folder) / ENCODER_FILE
    encoder = prompt_encoder(peft_model)
    state = load_file(str(path), device=str(encoder.embedding.weight.device))
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        raise ValueError(f"{path}: encoder shapes {found} do not match this prompt {expected}")
    encoder.load_state_dict(state)


def prompt_summary(peft_model) -> dict:
    """What the manifest records about the prompt."""
    cfg = peft_model.peft_config[ADAPTER]
    return {
        "method": "p_tuning",
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "encoder_hidden_size": cfg.encoder_hidden_size,
        "encoder_reparameterization_type": str(getattr(cfg.encoder_reparameterization_type, "value", cfg.encoder_reparameterization_type)),
        "token_dim": cfg.token_dim,
        "trainable_params": sum(p.numel() for p in trainable_parameters(peft_model)),
    }
