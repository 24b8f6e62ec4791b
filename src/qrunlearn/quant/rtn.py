"""Round-to-nearest (RTN) weight quantization in plain torch.

The arithmetic follows torchao's affine quantization (`IntxWeightOnlyConfig`, AFFINE qparams) operation for
operation, so the two agree bit for bit (tests/quant/test_rtn.py checks this when torchao is installed):
  signed codes in [-2^(b-1), 2^(b-1) - 1]; per group of `group_size` input columns (per row when None):
  asymmetric: the range [min(w_min, 0), max(w_max, 0)] -> scale = range / (2^b - 1),
              zero = clamp(qmin - round(min / scale));
  symmetric:  scale = max|w| / ((2^b - 1) / 2), zero = 0;
  q = clamp(round(w * (1 / scale)) + zero), w_hat = (q - zero) * scale.
`RTNLinear` stores the integer codes, scales and zero points; its forward uses the weight dequantized once from
those codes (cached), so it computes exactly what real integer storage would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qrunlearn.models.layers import as_linear, is_plain_linear, set_submodule, target_linear_names
from qrunlearn.quant.common import QuantizedWeight, check_group_divides
from qrunlearn.quant.spec import QuantSpec


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    out_features, in_features = weight.shape
    group = in_features if group_size is None else group_size
    return weight.reshape(out_features, in_features // group, group)


def rtn_qparams(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool):
    """(scale [out, groups, 1] float, zero_point [out, groups, 1] float holding integers, qmin, qmax)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    grouped = _grouped(weight, group_size)
    min_neg = torch.clamp(grouped.amin(dim=-1, keepdim=True), max=0)
    max_pos = torch.clamp(grouped.amax(dim=-1, keepdim=True), min=0)
    eps = torch.finfo(weight.dtype).smallest_normal
    if symmetric:
        scale = torch.clamp(torch.maximum(-min_neg, max_pos) / (float(qmax - qmin) / 2), min=eps)
        zero = torch.zeros_like(scale)
    else:
        scale = torch.clamp((max_pos - min_neg) / float(qmax - qmin), min=eps)
        zero = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax)
    return scale, zero, qmin, qmax


def _grouped_codes(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool):
    """(codes [out, groups, group] as floats holding integers, scale, zero point), in the weight's dtype."""
    scale, zero, qmin, qmax = rtn_qparams(weight, bits, group_size, symmetric)
    codes = torch.clamp(torch.round(_grouped(weight, group_size) * (1.0 / scale)) + zero, qmin, qmax)
    return codes, scale, zero


def rtn_dequantize(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> torch.Tensor:
    """The weight an `RTNLinear` computes with, (codes - zero) * scale, in the weight's own dtype (no gradient).
    Fake quantization (quant/fake.py) uses this, so training sees exactly the deployed weight."""
    codes, scale, zero = _grouped_codes(weight.detach(), bits, group_size, symmetric)
    return ((codes - zero) * scale).reshape(weight.shape)


def rtn_quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> QuantizedWeight:
    """Codes, dequantized weight and per-element step of one [out, in] weight."""
    weight = weight.detach()
    codes, scale, zero = _grouped_codes(weight, bits, group_size, symmetric)
    dequant = ((codes - zero) * scale).reshape(weight.shape)
    step = scale.expand_as(codes).reshape(weight.shape)
    return QuantizedWeight(codes=codes.reshape(weight.shape).to(torch.int64), dequant=dequant.float(),
                           step=step.float())


class RTNLinear(nn.Module):
    """A linear layer stored as int8 codes + per-group scale and zero point."""

    is_qrunlearn_quantized = True
    # registered in __init__; declared so that the type checker sees tensors, not `Tensor | Module`
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    weight: torch.Tensor
    bias: nn.Parameter | None

    def __init__(self, linear: nn.Linear, bits: int, group_size: int | None, symmetric: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        weight = linear.weight.detach()
        codes, scale, zero = _grouped_codes(weight, bits, group_size, symmetric)
        self.register_buffer("codes", codes.reshape(weight.shape).to(torch.int8))
        self.register_buffer("scale", scale.squeeze(-1))
        self.register_buffer("zero_point", zero.squeeze(-1).to(torch.int8))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        # Dequantized once from the stored integers; not saved (RTN folders keep fp weights + the spec).
        self.register_buffer("weight", self.dequantize(), persistent=False)

    def dequantize(self) -> torch.Tensor:
        grouped = _grouped(self.codes, self.group_size).to(self.scale.dtype)
        zero = self.zero_point.to(self.scale.dtype).unsqueeze(-1)
        return ((grouped - zero) * self.scale.unsqueeze(-1)).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        group = self.group_size if self.group_size is not None else "per-channel"
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={group}, sym={self.symmetric}"


def quantize_model(model: nn.Module, spec: QuantSpec) -> nn.Module:
    assert spec.bits is not None, "parse_spec gives every rtn spec its bit width"
    check_group_divides(model, spec.group_size, spec.label)
    for name in target_linear_names(model):
        module = model.get_submodule(name)
        if is_plain_linear(module):
            set_submodule(model, name, RTNLinear(as_linear(module), spec.bits, spec.group_size, spec.symmetric))
    return model


def codes_from_module(module: nn.Module) -> torch.Tensor | None:
    return module.codes.to(torch.int64) if isinstance(module, RTNLinear) else None


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    assert spec.bits is not None, "parse_spec gives every rtn spec its bit width"
    return rtn_quantize_weight(weight, spec.bits, spec.group_size, spec.symmetric)
