"""Loss helpers against values computed by hand on tiny logits."""
import math

import torch

from utils.forward import gather_label_logits
from utils.losses import ce_per_sample, kl_per_sample, masked_mean, sequence_logprob

IGN = -100


def test_ce_single_token_by_hand():
    # vocab 3, logits [0, ln 2, 0] -> softmax [1/4, 1/2, 1/4]
    logits = torch.tensor([[[0.0, math.log(2), 0.0]]])
    assert torch.allclose(ce_per_sample(logits, torch.tensor([[1]])), torch.tensor([math.log(2)]))
    assert torch.allclose(ce_per_sample(logits, torch.tensor([[0]])), torch.tensor([math.log(4)]))


def test_ce_per_sample_averages_own_label_tokens_only():
    logits = torch.zeros(2, 2, 4)  # uniform: every token costs ln 4
    logits[0, 1, 3] = math.log(3)  # sample 0, second token: p(3) = 3/6 = 1/2
    labels = torch.tensor([[0, 3], [2, IGN]])
    got = ce_per_sample(logits, labels)
    want = torch.tensor([(math.log(4) + math.log(2)) / 2, math.log(4)])  # padding not averaged in
    assert torch.allclose(got, want)


def test_sequence_logprob_sums_tokens():
    logits = torch.zeros(1, 2, 4)
    assert torch.allclose(sequence_logprob(logits, torch.tensor([[1, 2]])), torch.tensor([2 * math.log(0.25)]))


def test_kl_direction_is_reference_to_current():
    # reference p = [3/4, 1/4], current q = [1/2, 1/2]
    ref = torch.log(torch.tensor([[[0.75, 0.25]]]))
    cur = torch.zeros(1, 1, 2)
    want_pq = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(p||q) = 0.1308
    want_qp = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(q||p) = 0.1438
    got = kl_per_sample(ref, cur, torch.tensor([[0]]))
    assert abs(got.item() - want_pq) < 1e-6
    assert abs(got.item() - want_qp) > 1e-3


def test_kl_zero_when_equal_and_averaged_over_label_tokens():
    x = torch.randn(2, 3, 5)
    assert torch.allclose(kl_per_sample(x, x, torch.tensor([[1, 2, 3], [1, IGN, IGN]])), torch.zeros(2), atol=1e-6)
    ref = torch.log(torch.tensor([[[0.75, 0.25], [0.5, 0.5]]]))
    cur = torch.zeros(1, 2, 2)
    want = (0.75 * math.log(1.5) + 0.25 * math.log(0.5) + 0.0) / 2
    assert abs(kl_per_sample(ref, cur, torch.tensor([[0, 1]])).item() - want) < 1e-6


def test_masked_mean_over_selected_samples_and_zero_when_none():
    v = torch.tensor([1.0, 2.0, 6.0], requires_grad=True)
    assert masked_mean(v, torch.tensor([True, False, True])).item() == 3.5
    none = masked_mean(v, torch.tensor([False, False, False]))
    assert none.item() == 0.0
    none.backward()  # still differentiable: a batch without forget samples must not crash
    assert torch.equal(v.grad, torch.zeros(3))


def test_gather_respects_virtual_token_offset():
    B, p, L, V = 2, 3, 4, 5
    logits = torch.arange(B * (p + L) * V, dtype=torch.float).view(B, p + L, V)
    label_pos = torch.tensor([[2], [1]])  # positions in the text, not counting the prompt
    got = gather_label_logits(logits, label_pos, num_virtual=p)
    assert torch.equal(got[0, 0], logits[0, 5])
    assert torch.equal(got[1, 0], logits[1, 4])
