"""HQQ (half-quadratic quantization) through hqq's `HQQLinear`: bits 2/3/4/8, groups along the input dimension
(axis=1), zero and scale kept unquantized. Codes are unpacked from `W_q` per layer; the step is the group scale."""

from __future__ import annotations

from typing import Any, TypeAlias

import torch
from torch import nn

from qrunlearn.errors import MissingDependencyError
from qrunlearn.models.layers import as_linear, is_plain_linear, set_submodule, target_linear_names
from qrunlearn.quant.common import QuantizedWeight, check_group_divides
from qrunlearn.quant.spec import QuantSpec

HQQLayer: TypeAlias = Any  # hqq's HQQLinear: hqq is imported lazily (an optional backend) and its `meta` is untyped


def _hqq():
    try:
        from hqq.core import quantize as hqq_quantize
    except ImportError:
        raise MissingDependencyError("hqq", "HQQ quantization", "quant") from None
    return hqq_quantize


def _hqq_linear(linear: nn.Linear, spec: QuantSpec, keep_original: bool) -> HQQLayer:
    hq = _hqq()
    config = hq.BaseQuantizeConfig(nbits=spec.bits, group_size=spec.group_size, axis=1)
    device = linear.weight.device
    return hq.HQQLinear(linear, quant_config=config, compute_dtype=linear.weight.dtype, device=str(device),
                        del_orig=not keep_original)


def _unpacked(module: HQQLayer) -> torch.Tensor:
    hq = _hqq()
    meta = module.meta
    shape = meta["shape"]
    codes = hq.Quantizer.unpack[meta["packing"]](module.W_q, dtype=torch.uint8)
    return codes.reshape(-1)[: shape.numel()].reshape(shape).to(torch.int64)


def codes_from_module(module: nn.Module) -> torch.Tensor | None:
    return _unpacked(module) if type(module).__name__ == "HQQLinear" else None


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    assert spec.group_size is not None, "the hqq grammar requires a group size (hqq:w{bits}g{group})"
    weight = weight.detach()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    layer = _hqq_linear(linear, spec, keep_original=True)
    codes = _unpacked(layer)
    scale = layer.meta["scale"].float().reshape(-1, 1)  # one per group of the flattened [out, in] weight
    step = scale.expand(-1, spec.group_size).reshape(weight.shape)
    return QuantizedWeight(codes=codes, dequant=layer.dequantize().float().reshape(weight.shape), step=step)


def quantize_model(model: nn.Module, spec: QuantSpec) -> nn.Module:
    _hqq()
    check_group_divides(model, spec.group_size, spec.label)
    for name in target_linear_names(model):
        module = model.get_submodule(name)
        if is_plain_linear(module):
            set_submodule(model, name, _hqq_linear(as_linear(module), spec, keep_original=False))
    return model
