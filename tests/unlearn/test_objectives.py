"""Each objective against a hand-computed value on a 2 x 3 batch (vocabulary 3) with one padded position."""

from __future__ import annotations

import math

import pytest
import torch

from qrunlearn.unlearn import objectives as obj

LN2, LN3 = math.log(2.0), math.log(3.0)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Every scored position has logits [0, ln 2, 0] -> p = [1/4, 1/2, 1/4]. Row 1's last label is padding; the
    position predicting it gets logits [10, 0, 0] so that forgetting the mask would change every value."""
    logits = torch.tensor([0.0, LN2, 0.0]).repeat(2, 3, 1)
    logits[1, 1] = torch.tensor([10.0, 0.0, 0.0])
    labels = torch.tensor([[0, 1, 0], [2, 0, -100]])
    # scored (shifted) targets: row 0 -> [1, 0]: NLL ln2 + ln4 = 3 ln2; row 1 -> [0]: NLL ln4 = 2 ln2
    return logits, labels


def test_sequence_nll_and_counts():
    nll, count = obj.sequence_nll(*_batch())
    assert torch.allclose(nll, torch.tensor([3 * LN2, 2 * LN2]))
    assert count.tolist() == [2, 1]


def test_nll_and_ga_are_token_means():
    logits, labels = _batch()
    assert obj.nll_loss(logits, labels).item() == pytest.approx(5 * LN2 / 3)
    assert obj.ga_loss(logits, labels).item() == pytest.approx(-5 * LN2 / 3)
    # an external denominator (the global batch's token count) replaces the local one
    assert obj.nll_loss(logits, labels, num_tokens=10.0).item() == pytest.approx(5 * LN2 / 10)


def test_npo_hand_value():
    logits, labels = _batch()
    ref = torch.tensor([LN2, 2 * LN2])
    # row 0: -(2/b) logsigmoid(b (3ln2 - ln2)) = 20 log(1 + 2^-0.2); row 1: -(2/b) logsigmoid(0) = 20 ln2
    expected = (20 * math.log(1 + 2 ** -0.2) + 20 * LN2) / 2
    assert obj.npo_loss(logits, labels, ref, beta=0.1).item() == pytest.approx(expected, rel=1e-6)


def test_simnpo_hand_value():
    logits, labels = _batch()
    beta, delta = 0.1, 0.5
    per_token = [1.5 * LN2, 2 * LN2]  # 3 ln2 / 2 tokens, 2 ln2 / 1 token
    expected = sum((2 / beta) * math.log(1 + math.exp(-beta * (v - delta))) for v in per_token) / 2
    assert obj.simnpo_loss(logits, labels, beta, delta).item() == pytest.approx(expected, rel=1e-6)


def test_kl_hand_value_and_padding_mask():
    logits, labels = _batch()
    ref_logits = torch.zeros_like(logits)  # uniform p_ref
    ref_logits[1, 1] = torch.tensor([-5.0, 5.0, 0.0])  # the padded position: must not count
    # KL(uniform || [1/4, 1/2, 1/4]) = -ln3 + (ln4 + ln2 + ln4) / 3 = -ln3 + 5 ln2 / 3 at each of the 3 positions
    expected = -LN3 + 5 * LN2 / 3
    assert obj.kl_loss(logits, ref_logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert obj.kl_loss(logits, logits.clone(), labels).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_is_not_computed_on_raw_logits():
    """Shifting every logit by a constant leaves both distributions, hence KL, unchanged (raw-logit KL would not)."""
    logits, labels = _batch()
    ref_logits = torch.zeros_like(logits)
    assert obj.kl_loss(logits + 7.0, ref_logits - 3.0, labels).item() == pytest.approx(
        obj.kl_loss(logits, ref_logits, labels).item(), rel=1e-5)


def test_combine():
    f, r = torch.tensor(2.0), torch.tensor(3.0)
    assert obj.combine(f, r, gamma=0.5, alpha=10.0).item() == pytest.approx(31.0)
    assert obj.combine(f, None, gamma=0.5, alpha=10.0).item() == pytest.approx(1.0)


def _toy_model(seed: int = 0):
    torch.manual_seed(seed)
    embed = torch.randn(5, 4)
    weight = torch.randn(4, 5, requires_grad=True)
    input_ids = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 0]])
    labels = input_ids.masked_fill(torch.tensor([[False] * 4, [False, False, False, True]]), -100)
    return embed, weight, input_ids, labels


def test_npo_gradient_at_reference_equals_ga_gradient():
    embed, weight, input_ids, labels = _toy_model()
    logits = embed[input_ids] @ weight
    ref_nll = obj.sequence_nll(logits.detach(), labels)[0]  # theta = ref

    (g_npo,) = torch.autograd.grad(obj.npo_loss(logits, labels, ref_nll, beta=0.1), weight, retain_graph=True)
    # GA on sequence-summed NLL (mean over sequences): the same gradient, scale exactly 1
    (g_ga_seq,) = torch.autograd.grad(-obj.sequence_nll(logits, labels)[0].mean(), weight, retain_graph=True)
    assert torch.allclose(g_npo, g_ga_seq, atol=1e-6)
    # and the token-mean GA gradient times (scored tokens / sequences) = 5 / 2
    (g_ga,) = torch.autograd.grad(obj.ga_loss(logits, labels), weight)
    assert torch.allclose(g_npo, g_ga * 5 / 2, atol=1e-6)
    # beta does not change it at theta = ref
    (g_npo_b,) = torch.autograd.grad(obj.npo_loss(embed[input_ids] @ weight, labels, ref_nll, beta=2.0), weight)
    assert torch.allclose(g_npo_b, g_ga_seq, atol=1e-6)


def test_global_denominators_make_split_batches_add_up():
    """Two halves normalised by the whole batch's counts sum to the whole-batch loss (accumulation / DDP)."""
    embed, weight, input_ids, labels = _toy_model(1)
    logits = embed[input_ids] @ weight
    ref = torch.tensor([1.0, 2.0])
    tokens = float((labels[:, 1:] != -100).sum())
    halves = [slice(0, 1), slice(1, 2)]
    for whole, part in [
        (obj.ga_loss(logits, labels), lambda s: obj.ga_loss(logits[s], labels[s], num_tokens=tokens)),
        (obj.npo_loss(logits, labels, ref, 0.1), lambda s: obj.npo_loss(logits[s], labels[s], ref[s], 0.1, 2.0)),
        (obj.simnpo_loss(logits, labels, 0.1), lambda s: obj.simnpo_loss(logits[s], labels[s], 0.1, 0.0, 2.0)),
        (obj.kl_loss(logits, logits * 0.5, labels),
         lambda s: obj.kl_loss(logits[s], logits[s] * 0.5, labels[s], num_tokens=tokens)),
    ]:
        assert sum(part(s) for s in halves).item() == pytest.approx(whole.item(), rel=1e-6)
