"""`kernels(model, enabled, inference)`: the package's speed-ups installed around a pass (see the package docstring)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from qrunlearn.models.kernels.attention import blocked_attention
from qrunlearn.models.kernels.onednn import fused_gated_mlp, onednn_linear


@dataclass(frozen=True)
class KernelsUsed:
    """What `kernels` switched on for its block."""

    onednn_linear: bool
    fused_mlps: int
    blocked_attention: bool


@contextlib.contextmanager
def kernels(model: nn.Module, enabled: bool, inference: bool, checkpointing: bool = False) -> Iterator[KernelsUsed]:
    """The CPU kernels around a pass of `model`: the oneDNN linears (not with `checkpointing`), and for
    `inference` passes also the fused MLPs and blocked attention. Yields what was switched on."""
    enabled = enabled and isinstance(model, nn.Module)  # a model run elsewhere (llama.cpp) brings its own kernels
    with onednn_linear(enabled and not checkpointing) as routed:
        if not inference:
            yield KernelsUsed(onednn_linear=routed, fused_mlps=0, blocked_attention=False)
            return
        with fused_gated_mlp(model, enabled) as fused, blocked_attention(model, enabled) as blocked:
            yield KernelsUsed(onednn_linear=routed, fused_mlps=fused, blocked_attention=blocked)
