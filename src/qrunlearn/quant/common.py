"""What every backend shares: which layers get quantized, and the per-weight result type.

Quantized layers: every linear layer (nn.Linear, or GPT-2's transformers Conv1D) inside the transformer block list
(the ModuleList whose length is `config.num_hidden_layers`). Embeddings and lm_head stay full precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias, TypeGuard

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qrunlearn.errors import UserError

FULL_PRECISION_NOTE = "embeddings, norms and lm_head stay full precision"

PlainLinear: TypeAlias = nn.Linear | Conv1D  # a full-precision linear layer (GPT-2's Conv1D stores [in, out])


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


def _is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)


def is_plain_linear(module: nn.Module) -> TypeGuard[PlainLinear]:
    """A full-precision linear layer (nn.Linear proper, not a quantized subclass, or a GPT-2 Conv1D)."""
    return type(module) is nn.Linear or _is_conv1d(module)


def linear_weight(module: PlainLinear) -> torch.Tensor:
    """The weight as [out_features, in_features] (Conv1D stores it transposed)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def as_linear(module: PlainLinear) -> nn.Linear:
    """An nn.Linear computing the same function (a copy for Conv1D, the module itself otherwise)."""
    if not isinstance(module, Conv1D):
        return module
    weight = module.weight.detach().t().contiguous()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    if module.bias is not None:
        linear.bias.data.copy_(module.bias.detach())
    return linear


def block_list_names(model: nn.Module) -> list[str]:
    """Names of the ModuleLists holding the transformer blocks (length == config.num_hidden_layers)."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and n_layers is not None and len(module) == n_layers]
    if not names:
        raise UserError(f"{type(model).__name__}: no transformer block list found (a ModuleList of "
                        f"config.num_hidden_layers={n_layers} blocks); cannot choose the layers to quantize")
    return names


def target_linear_names(model: nn.Module) -> list[str]:
    """Every linear layer (quantized or not yet) inside the transformer blocks, in module order."""
    prefixes = tuple(f"{name}." for name in block_list_names(model))
    names = [name for name, module in model.named_modules()
             if name.startswith(prefixes) and (isinstance(module, nn.Linear) or _is_conv1d(module)
                                               or _is_quantized_linear(module))]
    if not names:
        raise UserError(f"{type(model).__name__}: no linear layers inside the transformer blocks")
    return names


def _is_quantized_linear(module: nn.Module) -> bool:
    # HQQLinear is not an nn.Linear subclass; our RTNLinear neither. Both carry this marker attribute or class name.
    return getattr(module, "is_qrunlearn_quantized", False) or type(module).__name__ == "HQQLinear"


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


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
