"""HQQ: the codes and steps qrunlearn reports are the ones hqq's layer holds. Each check recomputes the dequantized
weight as scale x (code - zero) from an `HQQLinear`'s own meta data (scale, zero, shape, group size, axis) and
compares it element by element, so a wrong code, a wrong step or a wrong group layout fails."""

import copy

import pytest
import torch
from torch import nn

hqq_quantize = pytest.importorskip("hqq.core.quantize")

from qrunlearn.quant import quantize_model, quantize_weight, quantized_codes  # noqa: E402

GROUP = 64


def _reference_layer(weight: torch.Tensor, bits: int) -> nn.Module:
    """hqq's own layer for `weight`, built with hqq's API alone: groups of 64 along the input dimension."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight)
    config = hqq_quantize.BaseQuantizeConfig(nbits=bits, group_size=GROUP, axis=1)
    return hqq_quantize.HQQLinear(linear, quant_config=config, compute_dtype=torch.float32, device="cpu",
                                  del_orig=False)


def _dequantized_from_meta(codes: torch.Tensor, meta: dict) -> torch.Tensor:
    """scale x (code - zero) per group, laid out as hqq lays out groups for its axis."""
    group, shape = meta["group_size"], meta["shape"]
    assert meta["axis"] == 1, "groups along the input dimension"
    grouped = codes.reshape(-1, group).to(meta["scale"].dtype)  # row-major [out, in] cut into groups of `group`
    assert meta["scale"].shape == meta["zero"].shape == (grouped.shape[0], 1)
    return ((grouped - meta["zero"]) * meta["scale"]).reshape(shape)


def _step_from_meta(meta: dict) -> torch.Tensor:
    return meta["scale"].reshape(-1, 1).expand(-1, meta["group_size"]).reshape(meta["shape"])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_codes_and_steps_are_hqqs(bits):
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    q = quantize_weight(weight, f"hqq:w{bits}g{GROUP}")
    layer = _reference_layer(weight, bits)
    meta = layer.meta
    assert meta["nbits"] == bits and meta["group_size"] == GROUP and tuple(meta["shape"]) == tuple(weight.shape)
    assert q.codes.dtype == torch.int64 and q.codes.shape == weight.shape
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 2 ** bits - 1
    assert len(torch.unique(q.codes)) > 2 ** bits // 2  # the codes use the range, not one level
    torch.testing.assert_close(q.dequant, _dequantized_from_meta(q.codes, meta), rtol=0, atol=0)
    torch.testing.assert_close(q.dequant, layer.dequantize().float(), rtol=0, atol=0)
    torch.testing.assert_close(q.step, _step_from_meta(meta), rtol=0, atol=0)
    # and the result is a quantization of this weight: within a step of it everywhere
    assert bool(((q.dequant - weight).abs() <= q.step).all())


def test_model_layers_codes_and_steps_are_hqqs(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    fp = copy.deepcopy(model)
    quantize_model(model, "hqq:w4g64")
    stored, computed = quantized_codes(model, "hqq:w4g64"), quantized_codes(fp, "hqq:w4g64")
    assert len(stored) == 14 and all(torch.equal(stored[n], computed[n]) for n in stored)
    for name, codes in stored.items():
        layer = model.get_submodule(name)
        dequant = layer.dequantize().float()
        torch.testing.assert_close(dequant, _dequantized_from_meta(codes, layer.meta), rtol=0, atol=0)
        per_weight = quantize_weight(fp.get_submodule(name).weight, "hqq:w4g64")
        torch.testing.assert_close(per_weight.dequant, dequant, rtol=0, atol=0)
        torch.testing.assert_close(per_weight.step, _step_from_meta(layer.meta), rtol=0, atol=0)
    batch = tokenizer(["Alice moved to"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
