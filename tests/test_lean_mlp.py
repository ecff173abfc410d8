"""utils.lean_mlp: the SwiGLU product that saves two tensors, not three, for the backward.
Hand-computed values on two elements, the saved tensors counted, and training runs with and
without it bit-identical (the SPUL prompt on a frozen model; a full fine-tuning baseline)."""
import math

import torch
import torch.nn.functional as F

from tests.tiny import tiny_llama
from utils.baselines import METHODS, NoReference, Weights, make_loss_fn
from utils.lean_mlp import SwiGLU, lean_mlps, swiglu_mlps
from utils.prompt import add_prompt, prompt_embeddings, trainable_parameters
from utils.spul_loss import SpulObjective
from utils.training import TrainConfig, train

V = 48


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_swiglu_by_hand():
    gate = torch.tensor([0.0, 1.0], requires_grad=True)
    up = torch.tensor([2.0, 3.0], requires_grad=True)
    out = SwiGLU.apply(gate, up)
    s1 = _sigmoid(1.0)
    assert torch.allclose(out, torch.tensor([0.0, 3 * s1]), atol=1e-6)  # silu(0) = 0, silu(1) = sigmoid(1)
    out.sum().backward()
    assert torch.allclose(up.grad, torch.tensor([0.0, s1]), atol=1e-6)  # d/d up = silu(gate)
    # d/d gate = up * silu'(gate), silu'(x) = s(x) (1 + x (1 - s(x))): silu'(0) = 1/2
    assert torch.allclose(gate.grad, torch.tensor([2 * 0.5, 3 * s1 * (1 + (1 - s1))]), atol=1e-6)


def test_swiglu_equals_autograd_bit_for_bit_and_saves_two_tensors():
    g = torch.Generator().manual_seed(0)
    gate0, up0, grad = (torch.randn(3, 7, 64, generator=g) for _ in range(3))

    def run(fn):
        gate, up = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fn(gate, up)
        out.backward(grad)
        return out.detach(), gate.grad, up.grad, {t.untyped_storage().data_ptr() for t in saved}

    plain, lean = run(lambda a, b: F.silu(a) * b), run(SwiGLU.apply)
    for a, b in zip(plain[:3], lean[:3]):
        assert torch.equal(a, b)
    assert len(plain[3]) == 3 and len(lean[3]) == 2  # gate, silu(gate), up -> gate, up


def test_lean_mlps_swaps_and_restores():
    model = tiny_llama(V)
    mlps = swiglu_mlps(model)
    assert len(mlps) == model.config.num_hidden_layers
    with lean_mlps(model) as n:
        assert n == len(mlps) and all("forward" in m.__dict__ for m in mlps)
    assert not any("forward" in m.__dict__ for m in mlps)
    with lean_mlps(model, enabled=False) as n:
        assert n == 0
    gelu = tiny_llama(V, hidden_act="gelu")  # another activation: left alone
    assert swiglu_mlps(gelu) == []


def _features(n=12):
    rows = []
    for i in range(n):
        ids = [1, 5 + i % 7, 9 + i % 5, 20 + i % 3, 30 + i % 4][: 3 + i % 3]
        forget = i % 3 == 0
        rows.append({"input_ids": ids, "label_ids": [ids[-1]], "label": i % 2, "is_forget": forget})
    return rows


def _cfg(lean):
    return TrainConfig(lr=1e-2, num_epochs=2, batch_size=4, warmup_ratio=0.0, seed=3, lean_mlp=lean)


def test_spul_training_is_bit_identical_with_the_lean_mlp():
    start = [p.detach().clone() for p in trainable_parameters(add_prompt(tiny_llama(V, seed=1), 4, 16, seed=2))]
    finals = []
    for lean in (False, True):
        model = add_prompt(tiny_llama(V, seed=1), num_tokens=4, hidden_size=16, seed=2)
        params = trainable_parameters(model)
        objective, seen = SpulObjective(prompt_embeddings, 1.0, 2.0), []

        def loss_fn(model, batch):  # records whether the MLPs run through SwiGLU during training
            seen.append(all("forward" in m.__dict__ for m in swiglu_mlps(model)))
            return objective(model, batch)

        loss_fn.global_counts = True
        stats = train(model, params, loss_fn, _features(), _cfg(lean), "cpu", 0)
        assert set(seen) == {lean}
        finals.append(([p.detach().clone() for p in params], [loss for _, loss, _ in stats.losses]))
    (p0, l0), (p1, l1) = finals
    assert l0 == l1 and len(l0) > 0
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert not all(torch.equal(a, b) for a, b in zip(start, p0))  # the prompt did train


def test_full_fine_tuning_is_bit_identical_with_the_lean_mlp():
    start = [p.detach().clone() for p in tiny_llama(V, seed=1).parameters()]
    finals = []
    for lean in (False, True):
        model = tiny_llama(V, seed=1)
        loss_fn = make_loss_fn(METHODS["gradient_ascent_descent"], NoReference(), Weights(retain=1.0))
        train(model, model.parameters(), loss_fn, _features(), _cfg(lean), "cpu", 0)
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))
    assert not all(torch.equal(a, b) for a, b in zip(start, finals[0]))  # the weights did train
