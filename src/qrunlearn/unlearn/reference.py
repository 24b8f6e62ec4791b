"""The model before unlearning, as NPO and KLR need it.

NPO needs only each forget chunk's summed NLL under the reference, a constant: it is computed once before
training. KLR needs the reference's next-token distribution on every retain batch: LoRA gets it from the same
model with its adapters disabled (no second copy); full fine-tuning keeps a frozen copy made before training.
"""

from __future__ import annotations

import copy

import torch

from qrunlearn.models.tiny import collate
from qrunlearn.unlearn import objectives
from qrunlearn.unlearn.config import UnlearnConfig
from qrunlearn.unlearn.data import UnlearnData


@torch.no_grad()
def reference_sequence_nll(model, data: UnlearnData, batch_size: int, pad_id: int) -> torch.Tensor:
    """NLL_ref(x) summed over each forget chunk, in chunk order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    values = []
    for first in range(0, len(data.forget), batch_size):
        batch = collate(data.forget[first:first + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        values.append(objectives.sequence_nll(logits, batch["labels"])[0].float().cpu())
    model.train(was_training)
    return torch.cat(values)


class KLReference:
    """p_ref for KLR: a frozen copy for full fine-tuning, the adapters-disabled model for LoRA."""

    def __init__(self, config: UnlearnConfig, model):
        self.copy = None
        if config.reg == "klr" and config.adapter == "full":
            self.copy = copy.deepcopy(model).eval()
            for p in self.copy.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def logits(self, unwrapped_model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.copy is not None:
            return self.copy(input_ids=input_ids, attention_mask=attention_mask).logits
        with unwrapped_model.disable_adapter():
            return unwrapped_model(input_ids=input_ids, attention_mask=attention_mask).logits
