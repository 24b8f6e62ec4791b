"""A model's output head set aside, so that a forward pass returns the final hidden states instead of logits.

Large-vocabulary logits for a whole batch are the biggest tensor of a forward pass; code that needs only some of
them (a chunk of positions for a loss, a few answer positions for an NLL) takes the hidden states and applies the
head itself. The model's own forward still runs (DDP, accelerate's autocast and hooks see an ordinary pass).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from qrunlearn.typing import HFModel


class _Passthrough(nn.Module):
    """Stands in for the output head: returns the hidden states it is given. Holds the head so that its parameters
    stay registered under the model (gradient sync, sharding, state dicts see the same parameters)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@contextlib.contextmanager
def hidden_states_forward(transformer: HFModel) -> Iterator[nn.Linear]:
    """Inside the block, `model(...).logits` holds the final hidden states [B, T, H] instead of logits; yields the
    output head (a causal LM's lm_head, an nn.Linear) to apply chunk by chunk. `transformer` is the Hugging Face
    model (peft's base model for LoRA)."""
    head = transformer.get_output_embeddings()
    transformer.set_output_embeddings(_Passthrough(head))
    try:
        yield head
    finally:
        transformer.set_output_embeddings(head)
