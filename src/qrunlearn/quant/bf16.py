"""bf16 as a deployment format: every linear layer in the transformer blocks stores its weight as bfloat16 (the cast,
round-to-nearest-even), computed in float32.

Casting a model to bf16 for serving is a rounding like any quantizer's: an unlearning update smaller than half a
bf16 ulp of its weight (2^-9 relative, ~2e-3) is erased. Only the weights are rounded here (compute stays in fp32),
so the figure isolates what can give back an update; embeddings and the head stay in full precision, as for every
other spec. The codes are the bf16 bit patterns (int16), the step each weight's ulp: 2^(e - 8) for |w| = m 2^e with
m in [0.5, 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qrunlearn.models.layers import as_linear, is_plain_linear, set_submodule, target_linear_names
from qrunlearn.quant.common import QuantizedWeight
from qrunlearn.quant.spec import QuantSpec

BF16_MANTISSA_BITS = 7  # explicit; 8 with the implicit leading one


def bf16_ulp(weight: torch.Tensor) -> torch.Tensor:
    """The gap between adjacent bf16 values at each element (float32); the smallest normal's for zeros."""
    _, exponent = torch.frexp(weight.detach().float())
    ulp = torch.ldexp(torch.ones_like(weight, dtype=torch.float32), exponent - 1 - BF16_MANTISSA_BITS)
    tiny = torch.finfo(torch.bfloat16).smallest_normal * 2.0 ** -BF16_MANTISSA_BITS
    return torch.where(weight == 0, torch.full_like(ulp, tiny), ulp)


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Codes (bf16 bit patterns), the rounded weight (float32) and each element's ulp."""
    rounded = weight.detach().to(torch.bfloat16)
    return QuantizedWeight(codes=rounded.view(torch.int16).to(torch.int64), dequant=rounded.float(),
                           step=bf16_ulp(weight))


class BF16Linear(nn.Module):
    """A linear layer whose weight is stored in bf16 and computed with in the input's dtype."""

    is_qrunlearn_quantized = True
    weight: torch.Tensor
    bias: nn.Parameter | None

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, weight=bf16"


def quantize_model(model: nn.Module, spec: QuantSpec) -> nn.Module:
    for name in target_linear_names(model):
        module = model.get_submodule(name)
        if is_plain_linear(module):
            set_submodule(model, name, BF16Linear(as_linear(module)))
    return model


def codes_from_module(module: nn.Module) -> torch.Tensor | None:
    return module.weight.view(torch.int16).to(torch.int64) if isinstance(module, BF16Linear) else None
