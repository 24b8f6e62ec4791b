"""Float32 linear layers through oneDNN on the CPU, for inference.

PyTorch sends float32 CPU matmuls to its BLAS, MKL in the official wheels. MKL chooses its kernels by CPU vendor and
runs its AVX2 code on AMD processors even where they have AVX-512; oneDNN, which every wheel also carries, chooses by
instruction set. Measured on an AMD EPYC (Zen 5), one thread, GFLOP/s MKL vs oneDNN: 2048^3 68 vs 157; SmolLM2's MLP
(1850 x 576 x 1536) 75 vs 174; its output head on 128 positions 56 vs 165; a decoding step's 8 rows 73 vs 109. The
results are the same products summed in another order, so they differ from MKL's in the last bits only.

`onednn_linear()` routes `torch.nn.functional.linear` (what every `nn.Linear` calls) to oneDNN's linear for float32
CPU tensors while no gradient is recorded. Everything else (CUDA, other dtypes, quantized layers, training) runs
unchanged. Attention is not affected: SDPA's CPU kernel keeps its own matmuls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode


def _find_onednn_linear():
    """oneDNN's linear op (the one TorchInductor uses on CPU), or None where this PyTorch build has none."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _find_onednn_linear()


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (not torch.is_grad_enabled() and weight.dim() == 2
            and all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype == torch.float32
                    and t.device.type == "cpu" for t in tensors))


class _OneDnnLinearMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, weight, bias = _linear_arguments(*args, **kwargs)
            if _eligible(x, weight, bias):
                return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
        return func(*args, **kwargs)


def _linear_arguments(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """`torch.nn.functional.linear`'s arguments, however they were passed."""
    return input, weight, bias


@contextlib.contextmanager
def onednn_linear(enabled: bool = True) -> Iterator[bool]:
    """Inside the block, eligible linear calls run through oneDNN (see the module docstring). Yields whether the
    routing is on: False when not `enabled` or where this PyTorch build has no oneDNN linear."""
    if not enabled or _ONEDNN_LINEAR is None:
        yield False
        return
    with _OneDnnLinearMode():
        yield True
