import copy
import json
import math

import pytest
import torch

from qrunlearn.errors import UserError
from qrunlearn.quant import plot_survival, quantize_weight, survival_report
from qrunlearn.quant.common import target_linear_names


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
    assert "identical" in report.verdict


def test_update_far_below_a_step_is_rounded_away_and_large_one_survives(tiny_model):
    gen = torch.Generator().manual_seed(0)
    tiny = _perturbed(tiny_model, lambda w: 1e-7 * torch.randn(w.shape, generator=gen))
    small = survival_report(tiny_model, tiny, "rtn:w4g64")
    assert small.overall.mean_abs_dw_in_steps < 1e-4
    assert small.overall.codes_changed_frac < 1e-3
    assert abs(small.overall.projection) < 0.05  # almost all of the update rounded away
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
    total = sum(layer.numel for layer in report.layers)
    assert report.overall.numel == total
    assert math.isclose(report.overall.codes_changed_frac,
                        sum(layer.codes_changed_frac * layer.numel for layer in report.layers) / total, rel_tol=1e-9)
    assert report.verdict.startswith(f"nf4 keeps {report.overall.projection * 100:.0f}% of the update's projection")
    assert f"of {len(report.layers)} layers keep < 50%" in report.verdict


def test_report_serialises_and_plots(tiny_model, tmp_path):
    gen = torch.Generator().manual_seed(2)
    report = survival_report(tiny_model, _perturbed(tiny_model, lambda w: 1e-3 * torch.randn(w.shape, generator=gen)),
                             "int8")
    data = json.loads(report.model_dump_json())
    assert data["spec"] == "int8" and len(data["layers"]) == 14
    assert set(data["layers"][0]) >= {"name", "codes_changed_frac", "projection", "cosine", "mean_abs_dw_in_steps"}
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
