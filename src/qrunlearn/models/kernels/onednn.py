"""Float32 linear layers through oneDNN on the CPU, for training and inference.

PyTorch sends float32 CPU matmuls to its BLAS, MKL in the official wheels. MKL chooses its kernels by CPU vendor and
runs its AVX2 code on AMD processors even where they have AVX-512; oneDNN, which every wheel also carries, chooses by
instruction set (on this project's AMD machines oneDNN runs float32 products 1.5-3x faster; the numbers are in
benchmarks/RESULTS.md, "Kernel measurements quoted from the code"). The results are the same products summed in
another order, so they differ from MKL's in the last bits only.

`onednn_linear()` routes `torch.nn.functional.linear` (what every `nn.Linear` calls) to oneDNN's linear for float32
CPU tensors outside autocast. With gradients recorded, the backward pass's two products (input gradient, weight
gradient) run through oneDNN too (`_OneDnnLinear`), so training gets the same speed-up. Everything else (CUDA, other
dtypes, autocast, quantized layers) runs unchanged. Attention is not affected: SDPA's CPU kernel keeps its own
matmuls.

`fused_gated_mlp(model)` runs a gated SiLU MLP (Llama, Mistral, Qwen2: down(silu(gate(x)) * up(x))) at inference
as two oneDNN products with the activation and the product fused into their output stage: SiLU and the elementwise
product otherwise each read and write the (positions x intermediate) activations from memory (RESULTS.md, same
section).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import cast

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


ONEDNN_LINEAR = _find_onednn_linear()


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (weight.dim() == 2 and x.dim() >= 2 and not torch.is_autocast_enabled("cpu")
            and all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype == torch.float32
                    and t.device.type == "cpu" for t in tensors))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return ONEDNN_LINEAR(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """y = x W^T + b with oneDNN for the forward product and both backward products (dx = dy W, dW = dy^T x).
    The second operand of each backward product goes in as a transposed view: oneDNN reorders that operand into its
    blocked layout on every call anyway, and takes the transpose in the same copy (SmolLM2's unlearning loop,
    one thread: 165.6 -> 181.7 tokens/s, the same losses to the last bit, against copying it contiguous first).
    The first operand must be contiguous."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _linear(grad_out, weight.t())
        if ctx.needs_input_grad[1]:
            grad_w = _linear(rows.t().contiguous(), x.reshape(-1, x.shape[-1]).t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0)
        return grad_x, grad_w, grad_b


class _OneDnnLinearMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, weight, bias = _linear_arguments(*args, **kwargs)
            if _eligible(x, weight, bias):
                if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
                    return _OneDnnLinear.apply(x, weight, bias)
                return _linear(x, weight, bias)
        return func(*args, **kwargs)


def _linear_arguments(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """`torch.nn.functional.linear`'s arguments, however they were passed."""
    return input, weight, bias


@contextlib.contextmanager
def onednn_linear(enabled: bool = True) -> Iterator[bool]:
    """Inside the block, eligible linear calls run through oneDNN (see the module docstring). Yields whether the
    routing is on: False when not `enabled` or where this PyTorch build has no oneDNN linear."""
    if not enabled or ONEDNN_LINEAR is None:
        yield False
        return
    with _OneDnnLinearMode():
        yield True


def _silu_types() -> tuple[type, ...]:
    try:  # transformers' own module for "silu" (ACT2FN), besides torch's
        from transformers.activations import SiLUActivation
    except ImportError:
        return (torch.nn.SiLU,)
    return (torch.nn.SiLU, SiLUActivation)


def _fusable_mlp(module: torch.nn.Module, silu: tuple[type, ...]) -> bool:
    gate, up = getattr(module, "gate_proj", None), getattr(module, "up_proj", None)
    return (type(gate) is torch.nn.Linear and type(up) is torch.nn.Linear and hasattr(module, "down_proj")
            and type(getattr(module, "act_fn", None)) in silu)


def _fused_forward(module: torch.nn.Module, plain_forward: Callable[[torch.Tensor], torch.Tensor]):
    gate, up = cast(torch.nn.Linear, module.gate_proj), cast(torch.nn.Linear, module.up_proj)
    down = cast(torch.nn.Module, module.down_proj)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not (_eligible(x, gate.weight, gate.bias) and _eligible(x, up.weight, up.bias)):
            return plain_forward(x)
        activated = ONEDNN_LINEAR(x, gate.weight, gate.bias, "swish", [], "")  # silu(gate(x))
        return down(ONEDNN_LINEAR.binary(x, activated, up.weight, up.bias, "mul"))  # up(x) * that
    return forward


@contextlib.contextmanager
def fused_gated_mlp(model: torch.nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, the model's gated SiLU MLPs whose gate and up projections are plain linear layers run
    their float32 CPU inference passes (no autograd) with SiLU and the product fused into oneDNN's products (see the
    module docstring); other passes, and MLPs with adapters or quantized projections, run unchanged. Yields the
    number of MLPs switched."""
    available = ONEDNN_LINEAR is not None and hasattr(ONEDNN_LINEAR, "binary")
    silu = _silu_types()
    mlps = [m for m in model.modules() if _fusable_mlp(m, silu)] if enabled and available else []
    # a forward set on the instance (accelerate's offloading hooks do that) is wrapped and put back afterwards
    previous = [mlp.__dict__.get("forward") for mlp in mlps]
    for mlp in mlps:
        mlp.forward = _fused_forward(mlp, mlp.forward)
    try:
        yield len(mlps)
    finally:
        for mlp, forward in zip(mlps, previous):
            if forward is None:
                del mlp.forward
            else:
                mlp.forward = forward
