"""utils.invariant: the output layer and the vocabulary sums give the same bits at any CPU
thread count, and the same bits as before at one thread."""
import pytest
import torch
import torch.nn.functional as F

from utils.invariant import linear_one_thread, one_thread
from utils.losses import kl_per_sample


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_one_thread_sets_and_restores(threads):
    torch.set_num_threads(2)
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError):
        with one_thread():
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


def _head(rows=5, d=24, vocab=40, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(d, vocab, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(vocab, d, generator=g))
        if bias:
            layer.bias.copy_(torch.randn(vocab, generator=g))
    x = torch.randn(rows, 1, d, generator=g)
    return layer, x


def _forward_backward(fn, layer, x, grad):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = fn(layer, x)
    out.backward(grad)
    return out.detach(), x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


@pytest.mark.parametrize("bias", [True, False])
def test_linear_one_thread_matches_the_layer(threads, bias):
    """At 2 threads the one-thread path gives what the plain layer gives at 1 thread: output and
    the gradients of input, weight and bias (hand-checked against the formulas as well)."""
    layer, x = _head(bias=bias)
    grad = torch.randn(5, 1, 40, generator=torch.Generator().manual_seed(1))
    torch.set_num_threads(1)
    plain = _forward_backward(lambda m, t: m(t), layer, x, grad)
    torch.set_num_threads(2)
    mine = _forward_backward(linear_one_thread, layer, x, grad)
    for a, b in zip(plain, mine):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.allclose(mine[1], grad @ layer.weight, atol=1e-5)
    assert torch.allclose(mine[2], grad.reshape(5, 40).t() @ x.reshape(5, 24), atol=1e-5)
    if bias:
        assert torch.allclose(mine[3], grad.reshape(5, 40).sum(0))


def test_linear_one_thread_at_vocabulary_scale_is_thread_invariant(threads):
    """A few rows against a SmolLM2-sized vocabulary: the same bits at 1 and 2 threads."""
    layer, x = _head(rows=5, d=576, vocab=49152, bias=False)
    grad = torch.randn(5, 1, 49152, generator=torch.Generator().manual_seed(2))
    out = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        out[n] = _forward_backward(linear_one_thread, layer, x, grad)
    for a, b in zip(out[1], out[2]):
        assert (a is None and b is None) or torch.equal(a, b)


def test_linear_one_thread_leaves_other_layers_alone(threads):
    """A layer with a hook (or of another type) is called as it is: its hook still runs."""
    torch.set_num_threads(2)
    layer, x = _head()
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    linear_one_thread(layer, x)
    assert seen == [torch.Size([5, 1, 40])]


def test_kl_of_one_row_is_thread_invariant(threads):
    """One row's KL sums the whole vocabulary into one value, which torch would split between
    threads."""
    g = torch.Generator().manual_seed(3)
    ref, cur = torch.randn(1, 1, 49152, generator=g) * 4, torch.randn(1, 1, 49152, generator=g) * 4
    labels = torch.tensor([[7]])
    out = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        out[n] = kl_per_sample(ref, cur, labels)
    assert torch.equal(out[1], out[2])
    expected = (F.softmax(ref, -1) * (F.log_softmax(ref, -1) - F.log_softmax(cur, -1))).sum().item()
    assert out[1].item() == pytest.approx(expected, rel=1e-5)
