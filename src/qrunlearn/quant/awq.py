"""AWQ (activation-aware weight quantization, Lin et al. 2023) through llmcompressor, in its own environment like
GPTQ (`make gptq-venv`). llmcompressor's AWQ is a transform: it searches per-channel scales from the calibration
activations (retain text, `gptq.Calibration`), folds them into the preceding norms and layers, and then a plain
round-to-nearest pass with the spec's scheme (asymmetric integers, one group per `group_size` inputs) quantizes the
scaled weights. The folder it writes is the compressed-tensors format vLLM serves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from qrunlearn.quant.gptq import Calibration, codes_from_module, llmcompressor_parts, run_oneshot, weight_scheme
from qrunlearn.quant.spec import QuantSpec

__all__ = ["codes_from_module", "quantize_model"]


@contextlib.contextmanager
def _no_pinning_without_an_accelerator() -> Iterator[None]:
    """llmcompressor 0.14's AWQ pins its cached activations in page-locked memory before every scale search (to speed
    up host-to-device copies), which raises "Cannot access accelerator device" on a CPU-only machine. Without an
    accelerator there is no copy to speed up: the pinning is skipped for the call, nothing else changes."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        yield
        return
    pin = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = pin  # type: ignore[method-assign]


def quantize_model(model: nn.Module, spec: QuantSpec, calibration: Calibration | None) -> nn.Module:
    llmcompressor_parts()
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    recipe = [AWQModifier(), QuantizationModifier(config_groups=weight_scheme(spec), ignore=["lm_head"])]
    with _no_pinning_without_an_accelerator():
        return run_oneshot(model, spec, recipe, calibration)
