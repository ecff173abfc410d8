"""CPU results that do not depend on the thread count (``--threads``).

On CPU most of a training step is thread-count invariant already: torch splits element-wise ops,
norms, softmax and attention between threads along output rows, and each output element is
computed in the same order whatever the count. Measured exceptions on SmolLM2-135M (torch 2.13,
MKL 2024.2, a SPUL step with the selected flags), each fixed here:

- matrix products (MKL's sgemm: every linear layer, forward and backward). In its default mode
  MKL picks its blocking, for some shapes including how it splits the inner dimension, from the
  thread count: the output layer on a step's 5 or 6 retain rows and the MLP's input gradient on
  the 30 soft-prompt rows differed in the last bits between 1 and 2 threads. MKL's strict
  conditional-numerical-reproducibility mode (``MKL_CBWR=AUTO,STRICT``) gives gemm the same bits
  at any thread count (Intel's documentation; checked here on those shapes). ``strict_blas``
  turns it on. MKL fixes its mode at its first call, so ``utils/__init__.py`` calls it when the
  package is imported.
- a sum that leaves a single value over many elements (one row's KL over the vocabulary): torch
  splits that reduction itself between threads. ``one_thread`` runs such a block on one thread.
- the no-grad forwards of a SPUL run (the KL reference on a batch's retain rows, the hard
  prefix's key/value cache): at 2 threads, in strict mode, the first reference forward of a
  training run gave other bits than the same forward later in the same process (memory-state
  dependent; which op, not found). ``utils.spul_loss`` runs them on one thread; with the
  reference cache that is the first epoch's reference only.

- the soft prompt's encoder (its p rows through a small MLP). MKL's strict mode covers the
  shapes above on the Xeon, but on an AMD EPYC (MKL's code path AUTO) some small products still
  gave other bits at 2 threads: (m x k) @ (k x n) with m about 4-9 and n 15-17, which is the
  test model's 4-token, 16-wide encoder (the CPU recipe's 30 x 576 x 128 products did not).
  ``on_one_thread`` runs the encoder's forward and backward on one thread, and ``save_prompt``
  runs PEFT's own pass through it (the stored embeddings) on one thread too.

A difference in the last bit is enough: a SPUL run is chaotic at CPU scale (docs), so the same
command at 1 and at 2 threads ended up to 17 points of val forget apart. What is checked is end
to end: the same ``spul.py`` command at 1 and 2 threads writes byte-identical metrics and prompt
(tests, and the runs in the docs). Strict mode keeps MKL's own choice of code path for the CPU
(``AUTO``), so another CPU model may still give other bits. A user who sets ``MKL_CBWR`` in the
environment keeps that setting (``MKL_CBWR=AVX2,STRICT`` pins the code path too; measured 1.5x
slower per SPUL step on an AVX-512 Xeon). MKL accepts its Intel code paths only on Intel CPUs: on
an AMD EPYC it refuses ``AVX2`` and ``AVX512`` and stays on ``AUTO`` (``COMPATIBLE`` is accepted);
the manifest's ``blas`` field records the mode in force, not the one asked for. GPU runs are untouched.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os

import torch

_STRICT = 0x10000  # MKL_CBWR_STRICT (mkl_cbwr.h)
_AUTO = 2  # MKL_CBWR_AUTO
_BRANCHES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2", 9: "AVX",
             10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}
_ALL = ~0  # mkl_cbwr_get: the whole setting
_MODE_CHANGE_FAILURE = -8  # mkl_cbwr_set: MKL has already run with another mode


def _mkl():
    """MKL's CNR functions inside torch's CPU library (exported as ``mkl_serv_cbwr_*``), or None
    when torch is not built with MKL (ARM, some source builds)."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return lib.mkl_serv_cbwr_get, lib.mkl_serv_cbwr_set, lib.mkl_serv_cbwr_get_auto_branch
    except (OSError, AttributeError):
        return None


def _describe(get, auto_branch) -> str:
    mode = get(_ALL)
    branch = _BRANCHES.get(mode & 0xFFFF, str(mode & 0xFFFF))
    text = f"MKL_CBWR={branch}{',STRICT' if mode & _STRICT else ''}"
    if branch == "AUTO":
        text += f" (code path {_BRANCHES.get(auto_branch(), auto_branch())})"
    return text


@functools.cache
def strict_blas() -> str:
    """Turn on MKL's strict CNR mode (unless ``MKL_CBWR`` is set in the environment, which MKL
    reads itself) and return what is in force, for the manifest: e.g. ``MKL_CBWR=AUTO,STRICT
    (code path AVX512_E1)``. Runs once per process (cached); the first call must come before
    MKL's first matrix product."""
    fns = _mkl()
    if fns is None:
        return "no MKL (torch's BLAS was not checked for thread-count invariance)"
    get, set_, auto_branch = fns
    if "MKL_CBWR" not in os.environ and set_(_AUTO | _STRICT) == _MODE_CHANGE_FAILURE:
        return "MKL default (not strict: MKL ran before utils was imported; results may depend on --threads)"
    return _describe(get, auto_branch)


def blas_is_strict() -> bool:
    """Whether MKL's gemm gives the same bits at any thread count in this process."""
    fns = _mkl()
    return fns is not None and bool(fns[0](_ALL) & _STRICT)


@contextlib.contextmanager
def one_thread(device=None):
    """Within the block torch runs on one CPU thread; the thread count is restored after. A
    no-op at one thread, and for work on another ``device`` than the CPU (a GPU's kernels do
    not depend on torch's CPU threads)."""
    n = torch.get_num_threads()
    if n == 1 or (device is not None and torch.device(device).type != "cpu"):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _OneThread(torch.autograd.Function):
    """``fn()``'s value and its gradient with respect to ``params``, each computed on one thread
    (the backward recomputes ``fn()``: meant for small blocks such as the prompt encoder)."""

    @staticmethod
    def forward(ctx, fn, device, *params):
        ctx.fn, ctx.device, ctx.params = fn, device, params
        with torch.no_grad(), one_thread(device):
            return fn()

    @staticmethod
    def backward(ctx, grad):
        with torch.enable_grad(), one_thread(ctx.device):
            out = ctx.fn()
            grads = torch.autograd.grad(out, ctx.params, grad, allow_unused=True)
        return (None, None, *grads)


def on_one_thread(fn, params, device=None) -> torch.Tensor:
    """``fn()`` (a tensor computed from the trainable ``params``) with its forward and its
    backward on one CPU thread. For the soft prompt's encoder: its matrices are small (p rows),
    and MKL's strict mode does not give every small shape the same bits at any thread count on
    every CPU (an AMD EPYC, code path AUTO: a (4 x 32) @ (32 x 16) product differed between 1
    and 2 threads; the CPU recipe's (30 x 576) @ (576 x 128) did not). Same operations as a plain
    call, so the same bits wherever one thread already gave them (tested). On another device
    than the CPU it is the plain call; under CPU autocast (``--mixed_precision bf16`` on a CPU)
    only the forward is held to one thread, since the backward's recomputation would run
    outside autocast."""
    if device is not None and torch.device(device).type != "cpu":
        return fn()
    if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)) or torch.is_autocast_enabled("cpu"):
        with one_thread(device):
            return fn()
    return _OneThread.apply(fn, device, *params)
