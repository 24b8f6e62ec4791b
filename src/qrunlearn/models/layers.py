"""Which layers are the transformer's: the block list, the linear layers inside it, and a plain view of each.

Quantization, unlearning (LoRA targets, FSDP wrapping, QUAIL's step, the memory estimate) and GGUF import all ask
the same question, so the answer lives here, in the models stage they all sit above. A transformer's blocks are
the ModuleList whose length is `config.num_hidden_layers`; its linear layers are nn.Linear or GPT-2's transformers
Conv1D (stored [in, out]), or a qrunlearn / HQQ quantized layer that replaced one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeAlias, TypeGuard

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qrunlearn.errors import UserError

PlainLinear: TypeAlias = nn.Linear | Conv1D  # a full-precision linear layer (GPT-2's Conv1D stores [in, out])


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


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks, in order (the first block list `block_list_names` finds)."""
    blocks = model.get_submodule(block_list_names(model)[0])
    assert isinstance(blocks, nn.ModuleList)
    return blocks


@contextlib.contextmanager
def block_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects what `module` returns (its first element when it returns a tuple, as decoder blocks may) on each
    forward inside the block."""
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: object, output: object) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)  # type: ignore[arg-type]

    handle = module.register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()
