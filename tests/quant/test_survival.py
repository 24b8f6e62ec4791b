import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qrunlearn.errors import UserError
from qrunlearn.models.layers import target_linear_names
from qrunlearn.quant import first_order, plot_survival, quantize_weight, survival_report

STEP = 1 / 16  # the toy's quantization step under rtn:w4 (per channel): a power of two, so every value is exact


def _perturbed(model, make_delta):
    new = copy.deepcopy(model)
    with torch.no_grad():
        for name in target_linear_names(new):
            weight = new.get_submodule(name).weight
            weight.add_(make_delta(weight))
    return new


def test_identical_models(tiny_model):
    report = survival_report(tiny_model, copy.deepcopy(tiny_model), "rtn:w4g64")
    assert report.overall.projection is None and report.overall.codes_changed_frac == 0.0
    assert report.overall.relative_error is None and report.layers[0].relative_error is None
    assert "identical" in report.verdict


def test_update_far_below_a_step_is_rounded_away_and_large_one_survives(tiny_model):
    gen = torch.Generator().manual_seed(0)
    tiny = _perturbed(tiny_model, lambda w: 1e-7 * torch.randn(w.shape, generator=gen))
    small = survival_report(tiny_model, tiny, "rtn:w4g64")
    assert small.overall.mean_abs_dw_in_steps < 1e-4
    assert small.overall.codes_changed_frac < 1e-3
    assert abs(small.overall.projection) < 0.05  # almost all of the update rounded away
    assert small.overall.relative_error >= 0.95
    big = survival_report(tiny_model, _perturbed(tiny_model, lambda w: 0.5 * w.std() * torch.randn(
        w.shape, generator=gen)), "rtn:w4g64")
    assert big.overall.mean_abs_dw_in_steps > 1
    assert big.overall.projection > 0.9 and big.overall.cosine > 0.9
    assert big.overall.codes_changed_frac > 0.5


def test_numbers_match_a_hand_computation(tiny_model):
    gen = torch.Generator().manual_seed(1)
    # a merged-LoRA-like update: rank 2 per layer
    new = _perturbed(tiny_model, lambda w: 0.02 * torch.randn(w.shape[0], 2, generator=gen)
                     @ torch.randn(2, w.shape[1], generator=gen))
    report = survival_report(tiny_model, new, "nf4")
    name = report.layers[3].name
    w, w2 = tiny_model.get_submodule(name).weight.detach(), new.get_submodule(name).weight.detach()
    qa, qb = quantize_weight(w, "nf4"), quantize_weight(w2, "nf4")
    dw, dq = (w2 - w).double().flatten(), (qb.dequant - qa.dequant).double().flatten()
    layer = report.layers[3]
    assert math.isclose(layer.projection, float(dq @ dw / (dw @ dw)), rel_tol=1e-9)
    assert math.isclose(layer.cosine, float(torch.nn.functional.cosine_similarity(dq, dw, dim=0)), rel_tol=1e-6)
    assert layer.codes_changed_frac == float((qa.codes != qb.codes).double().mean())
    assert math.isclose(layer.mean_abs_dw_in_steps, float((dw.abs() / qa.step.double().flatten()).mean()),
                        rel_tol=1e-9)
    assert math.isclose(layer.relative_error, float((dq - dw).norm() / dw.norm()), rel_tol=1e-9)
    total = sum(layer.numel for layer in report.layers)
    assert report.overall.numel == total
    assert math.isclose(report.overall.codes_changed_frac,
                        sum(layer.codes_changed_frac * layer.numel for layer in report.layers) / total, rel_tol=1e-9)
    err = norm = 0.0  # over all layers' sums, not a mean of the layers' ratios
    for layer in report.layers:
        a, b = tiny_model.get_submodule(layer.name).weight.detach(), new.get_submodule(layer.name).weight.detach()
        d_w = (b - a).double()
        d_q = (quantize_weight(b, "nf4").dequant - quantize_weight(a, "nf4").dequant).double()
        err, norm = err + float((d_q - d_w).square().sum()), norm + float(d_w.square().sum())
    assert math.isclose(report.overall.relative_error, math.sqrt(err / norm), rel_tol=1e-9)
    assert report.verdict.startswith(f"nf4: relative error ||dQ - dW||/||dW|| = {report.overall.relative_error:.2f}")
    assert f"mean |dW| = {report.overall.mean_abs_dw_in_steps:.3f} quantization steps" in report.verdict
    assert "keeps" not in report.verdict


def test_report_serialises_and_plots(tiny_model, tmp_path):
    gen = torch.Generator().manual_seed(2)
    report = survival_report(tiny_model, _perturbed(tiny_model, lambda w: 1e-3 * torch.randn(w.shape, generator=gen)),
                             "int8")
    data = json.loads(report.model_dump_json())
    assert data["spec"] == "int8" and len(data["layers"]) == 14
    assert set(data["layers"][0]) >= {"name", "codes_changed_frac", "projection", "cosine", "mean_abs_dw_in_steps",
                                      "relative_error"}
    png = plot_survival(report, tmp_path / "survival.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fp_spec_and_shape_mismatch_are_user_errors(tiny_model):
    with pytest.raises(UserError, match="needs a quantizer"):
        survival_report(tiny_model, tiny_model, "fp")
    other = copy.deepcopy(tiny_model)
    other.model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(torch.zeros(64, 128))
    with pytest.raises(UserError, match="weight shapes differ"):
        survival_report(tiny_model, other, "rtn:w4g64")


def test_merged_peft_lora_model(tiny_model):
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(tiny_model)
    lora = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for name, param in lora.named_parameters():
            if "lora_B" in name:  # B starts at zero; give the adapters a visible update
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    merged = lora.merge_and_unload()
    report = survival_report(base, merged, "rtn:w4g64")
    assert len(report.layers) == 14 and all(layer.projection is not None for layer in report.layers)
    assert report.overall.codes_changed_frac > 0.01 and 0 < report.overall.cosine <= 1


def test_small_random_update_projects_to_one_yet_mostly_rounds_away(tiny_model):
    """Why relative error leads: round-to-nearest is unbiased for weights spread over their bins (E[dQ] = dW), so
    the projection is about 1 for an update of 0.05 steps, while the quantized update is mostly rounding noise."""
    gen = torch.Generator().manual_seed(4)
    report = survival_report(tiny_model, _perturbed(tiny_model, lambda w: 0.02 * w.std() * torch.randn(
        w.shape, generator=gen)), "rtn:w4g64")
    assert 0.03 < report.overall.mean_abs_dw_in_steps < 0.1
    assert abs(report.overall.projection - 1) < 0.1
    assert report.overall.relative_error > 2


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 2)  # the one quantized layer; its bias stays full precision


class _Toy(nn.Module):
    """One transformer block holding one linear layer, plus a norm-like weight outside the blocks."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=1)
        self.layers = nn.ModuleList([_Block()])
        self.norm = nn.Parameter(torch.ones(4))
        with torch.no_grad():
            # each row holds every level of a 4-bit per-channel grid once: min -8 and max 7 steps fix the scale at
            # STEP and the zero point at 0, so Q(W) = W
            levels = torch.arange(-8, 8, dtype=torch.float32) * STEP
            self.layers[0].proj.weight.copy_(torch.stack([levels, levels.flip(0)]))
            self.layers[0].proj.bias.zero_()


def _toy_update(steps: float, entries) -> tuple[_Toy, _Toy]:
    """The toy and a copy whose weight moves by `steps` * STEP at `entries` (none of them a row's min or max)."""
    base = _Toy()
    new = copy.deepcopy(base)
    with torch.no_grad():
        for row, col in entries:
            new.layers[0].proj.weight[row, col] += steps * STEP
    return base, new


def test_relative_error_on_weights_on_the_grid():
    base, _ = _toy_update(0, [])
    weight = base.layers[0].proj.weight.detach()
    assert torch.equal(quantize_weight(weight, "rtn:w4").dequant, weight)
    entries = [(0, 3), (0, 9), (1, 5)]
    # one whole step on the grid: dQ = dW exactly
    whole = survival_report(*_toy_update(1.0, entries), "rtn:w4")
    assert whole.layers[0].relative_error == 0.0 and whole.overall.relative_error == 0.0
    assert whole.overall.projection == 1.0 and whole.overall.codes_changed_frac == 3 / 32
    assert whole.overall.mean_abs_dw_in_steps == 3 / 32
    # a quarter step rounds back to the same code: dQ = 0
    quarter = survival_report(*_toy_update(0.25, entries), "rtn:w4")
    assert quarter.overall.relative_error == 1.0 and quarter.overall.projection == 0.0
    assert quarter.overall.codes_changed_frac == 0.0
    assert quarter.verdict.startswith("rtn:w4: relative error ||dQ - dW||/||dW|| = 1.00")


def _toy_gradient(weight: torch.Tensor, bias: float = 0.0, norm: float = 0.0) -> dict:
    return {"layers.0.proj.weight": weight, "layers.0.proj.bias": torch.full((2,), bias),
            "norm": torch.full((4,), norm)}


def test_first_order_equals_a_hand_computation():
    # entry (0, 3) moves a whole step (carried by Q), entry (1, 5) a quarter step (rounded away)
    base, new = _toy_update(1.0, [(0, 3)])
    with torch.no_grad():
        new.layers[0].proj.weight[1, 5] += 0.25 * STEP
    g = torch.zeros(2, 16)
    g[0, 3], g[1, 5], g[1, 0] = 2.0, 4.0, 100.0  # (1, 0) did not move: no weight there counts
    result = first_order(base, new, "rtn:w4", _toy_gradient(g))
    assert result.layers == 1 and result.spec == "rtn:w4"
    assert result.g_dw == 2.0 * STEP + 4.0 * 0.25 * STEP  # 0.1875
    assert result.g_dq == 2.0 * STEP  # the quarter step is gone
    assert result.g_dw_unquantized == 0.0 and result.g_target_shift == 0.0  # Q(W) = W
    assert result.predicted_retained == pytest.approx(2 / 3, rel=1e-12)
    assert result.predicted_reversion == pytest.approx(1 / 3, rel=1e-12)


def test_parameters_outside_the_quantized_layers_carry_their_update_into_both_sums():
    base, new = _toy_update(0.25, [(0, 3)])  # rounded away in the quantized layer
    with torch.no_grad():
        new.norm.add_(0.5)  # norm: 4 entries, +0.5 each
        new.layers[0].proj.bias.add_(1.0)  # a quantized layer's bias is not quantized either
    g = torch.zeros(2, 16)
    g[0, 3] = 8.0
    result = first_order(base, new, "rtn:w4", _toy_gradient(g, bias=0.5, norm=3.0))
    other = 4 * 3.0 * 0.5 + 2 * 0.5 * 1.0  # 7
    assert result.g_dw_unquantized == other
    assert result.g_dw == 8.0 * 0.25 * STEP + other
    assert result.g_dq == other
    assert result.predicted_retained == pytest.approx(other / (other + 0.125), rel=1e-12)


def test_first_order_target_shift():
    base, new = _toy_update(1.0, [(0, 3)])
    with torch.no_grad():  # the target itself off the grid: Q moves it back by a quarter step at (1, 5)
        base.layers[0].proj.weight[1, 5] += 0.25 * STEP
        new.layers[0].proj.weight[1, 5] += 0.25 * STEP
    g = torch.zeros(2, 16)
    g[0, 3], g[1, 5] = 2.0, 4.0
    result = first_order(base, new, "rtn:w4", _toy_gradient(g))
    assert result.g_dw == result.g_dq == 2.0 * STEP
    assert result.g_target_shift == -4.0 * 0.25 * STEP
    # the quantizer moves target and unlearned model alike: precision-matched, nothing is given back
    assert result.predicted_reversion == 0.0


def test_first_order_needs_the_gradient_of_every_parameter_by_name(tiny_model):
    base, new = _toy_update(1.0, [(0, 3)])
    gradient = _toy_gradient(torch.zeros(2, 16))
    del gradient["norm"]
    with pytest.raises(UserError, match=r"missing \['norm'\]"):
        first_order(base, new, "rtn:w4", gradient)
    with pytest.raises(UserError, match=r"unknown \['extra'\]"):
        first_order(base, new, "rtn:w4", {**_toy_gradient(torch.zeros(2, 16)), "extra": torch.zeros(1)})
    with pytest.raises(UserError, match="needs a quantizer"):
        first_order(base, new, "fp", _toy_gradient(torch.zeros(2, 16)))
    zero = first_order(tiny_model, copy.deepcopy(tiny_model), "nf4",
                       {name: torch.ones(p.shape) for name, p in tiny_model.named_parameters()})
    assert zero.g_dw == 0.0 and zero.predicted_retained is None and zero.predicted_reversion is None
    assert zero.layers == len(target_linear_names(tiny_model))


def test_first_order_matches_the_layer_sums_on_the_tiny_llama(tiny_model):
    """Every block linear's weight counts through Q, every other parameter (embeddings, norms) through dW."""
    gen = torch.Generator().manual_seed(5)
    new = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for param in new.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=gen))
    gradient = {name: torch.randn(p.shape, generator=gen) for name, p in new.named_parameters()}
    result = first_order(tiny_model, new, "rtn:w4g64", gradient)
    base_params = dict(tiny_model.named_parameters())
    quantized = {f"{name}.weight" for name in target_linear_names(tiny_model)}
    g_dw = g_dq = 0.0
    for name, param in new.named_parameters():
        g, w, w_new = gradient[name].double(), base_params[name].detach(), param.detach()
        g_dw += float((g * (w_new.double() - w.double())).sum())
        if name in quantized:
            dq = quantize_weight(w_new, "rtn:w4g64").dequant.double() - quantize_weight(w, "rtn:w4g64").dequant.double()
            g_dq += float((g * dq).sum())
        else:
            g_dq += float((g * (w_new.double() - w.double())).sum())
    assert len(quantized) == 14 and any("norm" in name for name in base_params)
    assert result.g_dw == pytest.approx(g_dw, rel=1e-9)
    assert result.g_dq == pytest.approx(g_dq, rel=1e-9)
