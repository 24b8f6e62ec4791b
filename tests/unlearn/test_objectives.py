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


# ---- the field's other objectives (issue 24), on the same batch --------------------------------------------------
def test_wga_weights_each_token_by_its_probability():
    nll, mask = obj.token_nll(*_batch())
    # scored p = 1/2, 1/4, 1/4: -(1/2 ln2 + 1/4 * 2 ln2 + 1/4 * 2 ln2) / 3 tokens
    assert obj.wga_from_tokens(nll, mask, power=1.0).item() == pytest.approx(-0.5 * LN2)
    # power 0 is gradient ascent
    assert obj.wga_from_tokens(nll, mask, power=0.0).item() == pytest.approx(obj.ga_loss(*_batch()).item())
    # the weights are constants: d loss / d NLL_t = -p_t / tokens
    leaf = nll.clone().requires_grad_(True)
    obj.wga_from_tokens(leaf, mask, power=1.0).backward()
    assert leaf.grad is not None
    assert torch.allclose(leaf.grad[0], torch.tensor([-1 / 6, -1 / 12]))


def test_satimp_weights_saturation_and_importance():
    nll, mask = obj.token_nll(*_batch())
    # w = p^5 (1 - p): 1/64 at p = 1/2, 3/4096 at p = 1/4 -> -(ln2 / 64 + 2 * 3/4096 * 2 ln2) / 3
    expected = -(LN2 / 64 + 12 / 4096 * LN2) / 3
    assert obj.satimp_from_tokens(nll, mask, 5.0, 1.0).item() == pytest.approx(expected)
    # importance power 0 and saturation power 1 is WGA
    wga = obj.wga_from_tokens(nll, mask, 1.0).item()
    assert obj.satimp_from_tokens(nll, mask, 1.0, 0.0).item() == pytest.approx(wga)


def test_undial_target_lowers_the_true_token_and_masks_padding():
    logits, labels = _batch()
    loss, mask = obj.undial_token_loss(logits, logits, labels, strength=LN2)
    # row 0 pos 0 (y=1): q = softmax([0, 0, 0]) = 1/3 each -> H(q, p) = 5 ln2 / 3
    # pos 1 (y=0) and row 1 pos 0 (y=0): q = softmax([-ln2, ln2, 0]) = [1/7, 4/7, 2/7] -> 10 ln2 / 7
    assert torch.allclose(loss, torch.tensor([[5 * LN2 / 3, 10 * LN2 / 7], [10 * LN2 / 7, 0.0]]))
    assert mask.tolist() == [[True, True], [True, False]]
    assert obj.nll_from_tokens(loss, mask).item() == pytest.approx(95 * LN2 / 63)


def test_undial_gradient_at_the_reference_is_p_minus_q():
    logits, labels = _batch()
    policy = logits.clone().requires_grad_(True)
    loss, mask = obj.undial_token_loss(policy, logits, labels, strength=LN2)
    obj.nll_from_tokens(loss, mask).backward()
    assert policy.grad is not None
    p, q = torch.tensor([0.25, 0.5, 0.25]), torch.full((3,), 1 / 3)
    assert torch.allclose(policy.grad[0, 0], (p - q) / 3)
    assert torch.allclose(policy.grad[1, 1], torch.zeros(3))  # padding
    # strength 0 distils the reference itself: zero gradient at the reference
    policy.grad = None
    loss, mask = obj.undial_token_loss(policy, logits, labels, strength=0.0)
    obj.nll_from_tokens(loss, mask).backward()
    assert torch.allclose(policy.grad, torch.zeros_like(policy.grad), atol=1e-7)


def test_dpo_hand_value_and_gradient_at_the_reference():
    preferred, rejected = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    ref_preferred, ref_rejected = torch.tensor([1.5, 2.0]), torch.tensor([2.0, 1.0])
    # margins: (1.5 - 1) - (2 - 3) = 1.5 and 0; beta 0.5
    expected = -(2 / 0.5) * (torch.nn.functional.logsigmoid(torch.tensor(0.75)) + math.log(0.5)) / 2
    assert obj.dpo_from_sequences(preferred, rejected, ref_preferred, ref_rejected, 0.5).item() == pytest.approx(
        expected.item())
    # at the reference: (2/beta) ln 2, and the gradient learns the refusal and unlearns the answer at equal weight
    win, lose = ref_preferred.clone().requires_grad_(True), ref_rejected.clone().requires_grad_(True)
    loss = obj.dpo_from_sequences(win, lose, ref_preferred, ref_rejected, 0.1)
    assert loss.item() == pytest.approx(20 * LN2)
    loss.backward()
    assert win.grad is not None and lose.grad is not None
    assert torch.allclose(win.grad, torch.tensor([0.5, 0.5])) and torch.allclose(lose.grad, torch.tensor([-0.5, -0.5]))


def test_rmu_control_vector_and_activation_loss():
    vector = obj.control_vector(16, 6.5, seed=3)
    assert vector.norm().item() == pytest.approx(6.5, rel=1e-6) and bool((vector >= 0).all())
    assert torch.equal(vector, obj.control_vector(16, 6.5, seed=3))
    assert not torch.equal(vector, obj.control_vector(16, 6.5, seed=4))
    states = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [9.0, 9.0]], [[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # to target [1, 1]: row 0 -> (0 + 4) / 2 = 2 (the padded 64 left out); row 1 -> (1 + 1) / 2 = 1; mean 1.5
    assert obj.activation_mse_from_states(states, torch.ones(2), mask).item() == pytest.approx(1.5)
    assert obj.activation_mse_from_states(states, torch.ones(2), mask, num_sequences=6.0).item() == pytest.approx(0.5)
    # the retain term at the reference is 0 with zero gradient
    policy = states.clone().requires_grad_(True)
    loss = obj.activation_mse_from_states(policy, states, mask)
    loss.backward()
    assert loss.item() == 0.0 and policy.grad is not None and not policy.grad.any()
