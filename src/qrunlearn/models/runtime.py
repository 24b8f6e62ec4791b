"""What the evaluation asks of a model that runs outside torch, one token sequence at a time (llama.cpp's
`models.llamacpp.LlamaCppModel`), so that the evaluation depends on these operations and not on a backend.

A torch model does not implement this: the evaluation runs it in batched passes of its own (right-padded rows, a
shared few-shot prefix's keys and values computed once, the head applied a tile of positions at a time), which
per-sequence calls cannot express without changing its speed and its float rounding. So the evaluation has one
question per operation, `isinstance(model, SequenceModel)`: the per-sequence route, or its batched torch route.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class SequenceModel(Protocol):
    """A model run one token sequence at a time, outside torch."""

    # what the evaluation record gives as the model's arithmetic (where a torch model's gives its dtype)
    description: str

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """(len(ids), vocab) float32 logits of every position, on the CPU."""
        ...

    def greedy(self, prompt: Sequence[int], max_new_tokens: int, eos: set[int],
               should_stop: Callable[[list[int]], bool] | None = None) -> list[int]:
        """Greedy new tokens after `prompt`: ends with an eos token (kept), after `max_new_tokens`, or once
        `should_stop(tokens so far)` is true (the rule of `eval.generation.generate_batch`)."""
        ...
