"""LoRA through peft: wrap a causal LM, find its linear projections, and merge for saving."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model
from transformers.pytorch_utils import Conv1D

from qrunlearn.errors import UserError
from qrunlearn.typing import HFModel


def default_lora_targets(model: HFModel) -> list[str]:
    """Leaf names of every linear projection except the output head: q/k/v/o/gate/up/down for Llama,
    c_attn/c_proj/c_fc (Conv1D) for GPT-2, and so on for other families."""
    head = model.get_output_embeddings()
    names: set[str] = set()
    for name, module in model.named_modules():
        if module is head:
            continue
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def wrap_lora(model: HFModel, r: int, alpha: float, dropout: float,
              targets: list[str] | None) -> tuple[HFModel, list[str]]:
    """A peft model with adapters on `targets` (None = `default_lora_targets`); base weights frozen."""
    resolved = targets if targets is not None else default_lora_targets(model)
    missing = [t for t in resolved if not any(n.rsplit(".", 1)[-1] == t for n, _ in model.named_modules())]
    if missing:
        raise UserError(f"--lora-targets: no module named {', '.join(missing)} in this model "
                        f"(linear layers: {', '.join(default_lora_targets(model))})")
    config = LoraConfig(r=r, lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int, but only divides it by r
                        lora_dropout=dropout, target_modules=resolved, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config), resolved


def merged_copy(peft_model: HFModel) -> HFModel:
    """W + (alpha/r) B A as a plain model, leaving `peft_model` untouched (costs one model copy)."""
    return copy.deepcopy(peft_model).merge_and_unload()
