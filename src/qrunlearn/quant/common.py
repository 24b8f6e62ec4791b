"""What every backend shares: the per-weight result type and the group rule.

Quantized layers: every linear layer inside the transformer block list (`models.layers.target_linear_names`).
Embeddings and lm_head stay full precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qrunlearn.errors import UserError
from qrunlearn.models.layers import is_plain_linear, linear_weight, target_linear_names

FULL_PRECISION_NOTE = "embeddings, norms and lm_head stay full precision"


@dataclass
class QuantizedWeight:
    """One weight matrix [out, in] under a quantizer.

    codes: the integer codes as stored (same shape as the weight; int64 for easy comparison);
    dequant: the weight the quantized layer computes with (float32, same shape);
    step: the quantization step that applies to each element (float32, same shape): the scale for uniform grids,
    the mean gap between adjacent levels for NF4/FP4.
    """

    codes: torch.Tensor
    dequant: torch.Tensor
    step: torch.Tensor


def check_group_divides(model: nn.Module, group_size: int | None, label: str) -> None:
    """The group rule for RTN/HQQ/GPTQ: the group size must divide every quantized layer's in_features.
    No silent fallback: a model whose widths don't fit gets an error naming the first layer that fails."""
    if group_size is None:
        return
    for name in target_linear_names(model):
        module = model.get_submodule(name)
        if not is_plain_linear(module):
            continue
        in_features = linear_weight(module).shape[1]
        if in_features % group_size:
            raise UserError(f"{label}: group size {group_size} does not divide in_features {in_features} of layer "
                            f"{name}; choose a group size that divides every layer width, or per-channel")


def mean_level_gap(code: torch.Tensor) -> float:
    """Mean distance between adjacent representable levels of a normalised code table (NF4/FP4: [-1, 1])."""
    levels = torch.unique(code.float())
    return float((levels.max() - levels.min()) / (levels.numel() - 1))
