"""bf16 as a format: the cast's codes, each weight's ulp, updates below half an ulp erased, and the model-level
route (stored codes equal computed codes; survival diagnostics read the ulp as the step)."""

from __future__ import annotations

import torch

from qrunlearn.quant import quantize_model, quantize_weight, quantized_codes, survival_report
from qrunlearn.quant.bf16 import BF16Linear, bf16_ulp


def test_codes_are_the_cast_and_the_step_is_the_ulp():
    weight = torch.tensor([[1.0, 0.75, -3.0, 0.0]])
    q = quantize_weight(weight, "bf16")
    assert torch.equal(q.dequant, weight.to(torch.bfloat16).float())
    assert torch.equal(q.codes, weight.to(torch.bfloat16).view(torch.int16).to(torch.int64))
    # bf16 keeps 8 significant bits: spacing 2^-7 in [1, 2), 2^-8 in [0.5, 1), 2^-6 in [2, 4)
    assert q.step[0, :3].tolist() == [2.0 ** -7, 2.0 ** -8, 2.0 ** -6]
    assert 0 < q.step[0, 3].item() < 1e-30


def test_an_update_below_half_an_ulp_is_erased():
    base = torch.tensor([[1.0, 1.0, 0.75]])
    updated = base + torch.tensor([[0.003, 0.005, -0.0019]])  # half-ulps: 0.0039, 0.0039, 0.00195
    rounded = quantize_weight(updated, "bf16").dequant
    assert rounded.tolist() == [[1.0, 1.0 + 2.0 ** -7, 0.75]]
    assert torch.equal(bf16_ulp(updated), bf16_ulp(base))


def test_model_route_stores_the_codes_it_computes(tiny_model):
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = tiny_model(ids).logits
    plain_codes = quantized_codes(tiny_model, "bf16")
    quantize_model(tiny_model, "bf16")
    stored = quantized_codes(tiny_model, "bf16")
    assert stored.keys() == plain_codes.keys() and all(torch.equal(stored[k], plain_codes[k]) for k in stored)
    assert sum(isinstance(m, BF16Linear) for m in tiny_model.modules()) == len(stored) == 14
    with torch.no_grad():
        logits = tiny_model(ids).logits
    assert 0 < (logits - reference).abs().max() < 0.05  # rounded in the last bits of bf16, not more


def test_survival_in_ulps(tiny_model_dir):
    from qrunlearn.models.loading import load_causal_lm

    base, _ = load_causal_lm(tiny_model_dir, device="cpu", with_tokenizer=False)
    unlearned, _ = load_causal_lm(tiny_model_dir, device="cpu", with_tokenizer=False)
    with torch.no_grad():
        for p in unlearned.parameters():
            p.mul_(1.0 + 1e-4)  # a relative update of 1e-4: ~1/40 of the ulp, below half: erased
    report = survival_report(base, unlearned, "bf16")
    # a shift of d ulps moves a weight across a rounding boundary with probability ~d: ~2% of the codes change
    assert 0.005 < report.overall.mean_abs_dw_in_steps < 0.05
    assert 0.0 < report.overall.codes_changed_frac < 0.05
