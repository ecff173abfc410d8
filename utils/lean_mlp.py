"""SwiGLU MLPs that keep two tensors for the backward instead of three.

A LLaMA-style MLP computes ``down(silu(gate(x)) * up(x))``. Autograd saves, per token and layer,
``gate(x)`` for the SiLU, and both ``silu(gate(x))`` and ``up(x)`` for the product: three
intermediate-size vectors (3 x 1536 floats for SmolLM2-135M), the largest share of the SPUL
step's saved activations. ``SwiGLU`` saves ``gate(x)`` and ``up(x)`` only and recomputes the SiLU
in the backward, with the same kernels autograd would run (``silu`` and ``silu_backward``), so
the values and gradients are bit-identical (tested) for one more element-wise op per layer.

Nothing else needs a custom backward: a linear layer whose weight is frozen already keeps only
its weight (autograd skips saving the input when no weight gradient is asked for), so the SPUL
step's frozen model saves no linear-layer inputs as it is.

``lean_mlps(model)`` swaps the forward of every such MLP for the duration of a ``with`` block
(``utils.training.train`` wraps every method's training in it) and restores it after.
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

SILU_CLASSES = ("SiLU", "SiLUActivation")  # torch.nn.SiLU, transformers.activations.SiLUActivation


class SwiGLU(torch.autograd.Function):
    """``silu(gate) * up``, saving ``gate`` and ``up`` (not ``silu(gate)``) for the backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def _lean_forward(self, x):
    return self.down_proj(SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


def swiglu_mlps(model) -> list[torch.nn.Module]:
    """The modules of ``model`` that compute ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``
    with a SiLU (LLaMA, Mistral, Qwen, SmolLM ...), found by their parts."""
    return [m for m in model.modules()
            if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))
            and type(m.act_fn).__name__ in SILU_CLASSES]


@contextlib.contextmanager
def lean_mlps(model, enabled: bool = True):
    """Within the block, every SwiGLU MLP of ``model`` runs through ``SwiGLU``; yields their number."""
    mlps = swiglu_mlps(model) if enabled else []
    for m in mlps:
        m.forward = types.MethodType(_lean_forward, m)  # an instance attribute shadows the class's forward
    try:
        yield len(mlps)
    finally:
        for m in mlps:
            m.__dict__.pop("forward", None)
