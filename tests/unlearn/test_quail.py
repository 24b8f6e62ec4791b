"""QUAIL's hinge against hand-computed values (a 2-token forget example, vocabulary 3) and its margin rule on
weights whose quantization step is known."""

from __future__ import annotations

import pytest
import torch

from qrunlearn.errors import UserError
from qrunlearn.unlearn.quail import half_mean_step, logit_distance, logit_space_margin, quail_loss, quail_margin


def _example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forget row of 3 tokens (2 scored positions) plus a row whose only scored position is padding.
    Row 0: position 0 is 5 away from the reference (a 3-4-5 triangle), position 1 is 1 away. Row 1's padded
    position is 10 away from its reference on purpose: counting it would change every value."""
    ref = torch.zeros(2, 3, 3)
    logits = torch.zeros(2, 3, 3)
    ref[0, 0] = torch.tensor([3.0, 4.0, 0.0])
    logits[0, 1] = torch.tensor([1.0, 0.0, 0.0])
    logits[0, 2] = torch.tensor([50.0, 0.0, 0.0])  # the last position predicts nothing: never scored
    logits[1, 0] = torch.tensor([0.0, 0.0, 0.1])
    ref[1, 1] = torch.tensor([10.0, 0.0, 0.0])
    labels = torch.tensor([[0, 1, 2], [0, 2, -100]])
    # scored: row 0 positions 0, 1 (distances 5, 1); row 1 position 0 (distance 0.1); row 1 position 1 padded
    return logits, ref, labels


def test_logit_distance_hand_values():
    logits, ref, labels = _example()
    distance, mask = logit_distance(logits, ref, labels)
    assert mask.tolist() == [[True, True], [True, False]]
    assert torch.allclose(distance, torch.tensor([[5.0, 1.0], [0.1, 0.0]]))


def test_hinge_hand_values():
    logits, ref, labels = _example()
    # margin 2: max(0, 2 - 5) + max(0, 2 - 1) + max(0, 2 - 0.1) = 0 + 1 + 1.9 over 3 scored positions
    assert quail_loss(logits, ref, labels, margin=2.0).item() == pytest.approx(2.9 / 3)
    # the global denominator (all micro-batches of the step) replaces the local count
    assert quail_loss(logits, ref, labels, margin=2.0, num_tokens=10.0).item() == pytest.approx(0.29)
    # margin 0.05: every scored position is already farther away -> exactly zero
    assert quail_loss(logits, ref, labels, margin=0.05).item() == 0.0


def test_zero_beyond_the_margin_with_zero_gradient():
    logits, ref, labels = _example()
    logits.requires_grad_(True)
    quail_loss(logits, ref, labels, margin=0.05).backward()
    assert not logits.grad.any()


def test_gradient_pushes_logits_away_from_the_reference():
    logits, ref, labels = _example()
    logits.requires_grad_(True)
    quail_loss(logits, ref, labels, margin=2.0).backward()
    # position (0, 1): d = 1 < 2, d loss / d z = -(z - z_ref) / d / 3 = [-1/3, 0, 0]
    assert torch.allclose(logits.grad[0, 1], torch.tensor([-1 / 3, 0.0, 0.0]))
    assert not logits.grad[0, 0].any()  # already beyond the margin
    assert not logits.grad[1, 1].any() and not logits.grad[0, 2].any()  # padding / unscored
    before, _ = logit_distance(logits.detach(), ref, labels)
    after, _ = logit_distance(logits.detach() - 0.5 * logits.grad, ref, labels)
    assert after[0, 1] > before[0, 1] and after[1, 0] > before[1, 0]  # a descent step moves them apart
    assert quail_loss(logits.detach() - 0.5 * logits.grad, ref, labels, margin=2.0) < quail_loss(
        logits.detach(), ref, labels, margin=2.0)


def test_at_the_reference_the_loss_is_the_margin_and_finite():
    """theta = ref at the first step: every distance is 0, the loss is the margin, the gradient 0 (not nan)."""
    logits, _, labels = _example()
    logits.requires_grad_(True)
    loss = quail_loss(logits, logits.detach().clone(), labels, margin=0.3)
    loss.backward()
    assert loss.item() == pytest.approx(0.3)
    assert torch.isfinite(logits.grad).all() and not logits.grad.any()


def test_negative_margin_rejected():
    logits, ref, labels = _example()
    with pytest.raises(ValueError, match="margin"):
        quail_loss(logits, ref, labels, margin=-0.1)


# ---- margin rule ------------------------------------------------------------------------------------------------

KNOWN = torch.tensor([[0.75, -0.3, 0.1, 0.0], [1.5, 0.2, -0.4, 0.0]])


def test_half_step_of_a_known_weight():
    # symmetric 4-bit per row: step = max|w| / 7.5 -> 0.1 and 0.2, mean 0.15, half 0.075
    assert half_mean_step([KNOWN], "rtn:w4:sym") == pytest.approx(0.075, rel=1e-6)
    # asymmetric 4-bit per row: step = (max(w_max, 0) - min(w_min, 0)) / 15 -> 1.05 / 15, 1.9 / 15
    assert half_mean_step([KNOWN], "rtn:w4") == pytest.approx(0.5 * (1.05 + 1.9) / 30, rel=1e-6)
    # groups of 2 (symmetric): steps 0.1, 0.1/7.5 | 0.2, 0.4/7.5, each covering 2 weights
    groups = [0.1, 0.1 / 7.5, 0.2, 0.4 / 7.5]
    assert half_mean_step([KNOWN], "rtn:w4g2:sym") == pytest.approx(0.5 * sum(groups) / 4, rel=1e-6)
    # 8 bits: the step shrinks by (2^8 - 1) / (2^4 - 1) = 17
    assert half_mean_step([KNOWN], "rtn:w8:sym") == pytest.approx(0.075 * 15 / 255, rel=1e-6)
    # int8 (bitsandbytes LLM.int8, row absmax / 127)
    pytest.importorskip("bitsandbytes")
    assert half_mean_step([KNOWN], "int8") == pytest.approx(0.5 * (0.75 + 1.5) / 2 / 127, rel=1e-6)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def test_model_margin_uses_the_block_linears_only():
    """Every block linear gets rows whose largest |w| is 0.75 (symmetric 4-bit step 0.1); the embeddings and
    lm_head get huge values that would dominate the mean if they were counted."""
    model = _tiny_llama()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.uniform_(-0.5, 0.5)
                module.weight[:, 0] = 0.75
        model.model.embed_tokens.weight.fill_(100.0)
        model.lm_head.weight.fill_(100.0)
    assert quail_margin(model, "rtn:w4:sym") == pytest.approx(0.05, rel=1e-6)
    assert quail_margin(model, "rtn:w4g16:sym") == pytest.approx(
        half_mean_step([m.weight for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and n != "lm_head"], "rtn:w4g16:sym"), rel=1e-9)


@pytest.mark.parametrize(("spec", "needle"), [("fp", "'fp' has no quantization step"),
                                              ("gptq:w4g16", "rtn:w4g16:sym"),
                                              ("rtn:w4g24", "group size 24 does not divide")])
def test_margin_errors_are_one_line(spec, needle):
    with pytest.raises(UserError) as err:
        quail_margin(_tiny_llama(), spec)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_logit_space_margin_is_half_the_displacement_quantization_causes():
    logits, ref, labels = _example()
    # scored displacements 5, 1, 0.1 (the padded 10 must not count): half their mean
    assert logit_space_margin(ref, logits, labels) == pytest.approx(0.5 * 6.1 / 3)
