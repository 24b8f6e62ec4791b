"""CPU speed-ups, in one place behind one switch: `with kernels(model, enabled, ...)` installs them around a pass
and removes them after, and `CpuKernels` is the one setting that turns them on (the evaluator's, the unlearning
recipe's and the target trainer's records all declare their field with it). The main paths read as plain PyTorch;
everything here changes speed, not what is computed (results differ in the last bits: summation order).

    onednn.py     float32 linear layers (forward and backward) through oneDNN instead of the default BLAS, and, at
                  inference, gated SiLU MLPs with the activation and the product fused into oneDNN's products
    attention.py  long causal float32 inference passes' attention as blocked oneDNN products instead of SDPA

None applies on CUDA, in bf16 / under autocast, or to quantized layers; the oneDNN linears stay off under
activation checkpointing (its recomputed forwards run in the backward pass, outside the routing, and must save
the tensors the first forward saved). Measurements: benchmarks/RESULTS.md.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from qrunlearn.lazy import lazy_exports

# The one definition of the switch (this module stays light: the configs that declare it load at start-up).
CpuKernels = Annotated[bool, Field(description="on CPU, float32 linear layers through oneDNN (2-2.5x the default "
                                               "BLAS on AMD CPUs, forward and backward), and at inference gated "
                                               "MLPs fused into its products and long causal passes' attention "
                                               "blocked (models.kernels); results differ in the last bits; false "
                                               "= plain PyTorch")]


_EXPORTS = {name: "qrunlearn.models.kernels.context" for name in ("KernelsUsed", "kernels")}
__all__ = sorted([*_EXPORTS, "CpuKernels"])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
