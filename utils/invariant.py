"""CPU results that do not depend on the thread count (``--threads``).

On CPU, most of a training step gives bit-identical results whatever ``torch.set_num_threads``
says: the work is split between threads along output rows, and each output element is summed in
the same order. Two kinds of op are the exception, measured on SmolLM2-135M (torch 2.13, MKL):

- the output layer at the label positions, a matmul with only a few rows (B*K, the batch's
  label tokens: 5 or 6 for the retain rows of a SPUL step's reference) against the whole
  vocabulary: MKL blocks it differently at 1 and 2 threads (logits differ by ~1e-6 relative),
  in the forward and in the backward;
- a sum over the vocabulary that leaves a single value (the KL of a batch with one row): torch
  splits the reduction itself between the threads.

A difference in the last bit is enough: a SPUL run is chaotic at CPU scale (docs), so the same
command at 1 and at 2 threads ended 17 points of val forget apart. ``one_thread`` runs a block on
one thread, and ``linear_one_thread`` is ``F.linear`` with its forward and backward each run
that way; both are no-ops at one thread (the results there are the ones before this module) and
on GPU. Measured cost at 2 threads: a SPUL step 3.25 s against 2.95 s without (+10%, an A/B
of 6 steps), more than the few rows' arithmetic explains; not yet investigated.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def one_thread():
    """Within the block torch runs on one thread; the thread count is restored after."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _OneThreadLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)``; the forward and the backward's matmuls on one thread."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        with one_thread():
            return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        with one_thread():
            if ctx.needs_input_grad[0]:
                grad_x = grad.matmul(weight)
            flat = grad.reshape(-1, grad.size(-1))
            if ctx.needs_input_grad[1]:
                grad_w = flat.t().mm(x.reshape(-1, x.size(-1)))
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = flat.sum(0)
        return grad_x, grad_w, grad_b


def needs_one_thread(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and torch.get_num_threads() > 1


def linear_one_thread(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a plain ``nn.Linear``, thread-count invariant on CPU. Any other layer
    (quantised, LoRA-wrapped, with hooks) and any GPU tensor run as ``layer(x)``."""
    plain = type(layer) is torch.nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks)
    if not (plain and needs_one_thread(x)):
        return layer(x)
    if not torch.is_grad_enabled():
        with one_thread():
            return F.linear(x, layer.weight, layer.bias)
    return _OneThreadLinear.apply(x, layer.weight, layer.bias)
