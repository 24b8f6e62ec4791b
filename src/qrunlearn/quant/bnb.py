"""bitsandbytes: NF4 / FP4 (block 64, double quantization off) and LLM.int8.

In memory, `quantize_model` replaces each block linear with a bnb `Linear4bit` / `Linear8bitLt` whose weight is
quantized when moved to the model's device (CPU or CUDA) — the same bnb kernels `BitsAndBytesConfig` uses.
On disk, `save_quantized` reloads the full-precision folder with `BitsAndBytesConfig(device_map=<device>)` and
`save_pretrained`s it, so the folder is a standard HF bitsandbytes checkpoint (quantization_config in config.json).

CPU pitfall: on CPUs with AVX512-BF16, `Linear4bit` repacks its weight on the first forward into a kernel that casts
activations to bf16 and needs out_features divisible by 32. We set `support_avx512bf16_for_cpu = False` on every
`Linear4bit` (dequantize + matmul in the compute dtype), which also keeps the stored 4-bit codes readable.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qrunlearn.errors import MissingDependencyError, UserError
from qrunlearn.models.layers import as_linear, is_plain_linear, set_submodule, target_linear_names
from qrunlearn.models.loading import resolve_dtype
from qrunlearn.quant.common import QuantizedWeight, mean_level_gap
from qrunlearn.quant.spec import BNB_BLOCKSIZE, QuantSpec

INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold (bnb / transformers default)


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        raise MissingDependencyError("bitsandbytes", "bitsandbytes quantization (nf4/fp4/int8)", "quant") from None
    return bitsandbytes


def _unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """bnb packs two 4-bit codes per byte, the first element in the high nibble."""
    flat = packed.reshape(-1).to(torch.uint8)
    pairs = torch.stack([(flat >> 4) & 0xF, flat & 0xF], dim=1).reshape(-1)
    return pairs[:numel].to(torch.int64)


def _step_4bit(absmax: torch.Tensor, code: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    numel = shape.numel()
    per_block = absmax.float().reshape(-1, 1) * mean_level_gap(code)
    return per_block.expand(-1, BNB_BLOCKSIZE).reshape(-1)[:numel].reshape(shape)


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Quantize one [out, in] weight exactly as the corresponding bnb layer does (same dtype, same device)."""
    bnb = _bnb()
    weight = weight.detach().contiguous()
    if spec.method == "int8":
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        step = (scb.float() / 127.0).unsqueeze(1)
        return QuantizedWeight(codes=cb.to(torch.int64), dequant=cb.float() * step,
                               step=step.expand_as(cb).contiguous())
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=BNB_BLOCKSIZE, compress_statistics=False,
                                                 quant_type=spec.method, quant_storage=torch.uint8)
    dequant = bnb.functional.dequantize_4bit(packed, state).float()
    codes = _unpack_4bit(packed, weight.numel()).reshape(weight.shape)
    return QuantizedWeight(codes=codes, dequant=dequant, step=_step_4bit(state.absmax, state.code, weight.shape))


def _linear4bit(linear: nn.Linear, spec: QuantSpec, compute_dtype: torch.dtype) -> nn.Module:
    bnb = _bnb()
    device = linear.weight.device
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=False, quant_type=spec.method,
                              quant_storage=torch.uint8, device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().to("cpu", copy=True), requires_grad=False,
                                     blocksize=BNB_BLOCKSIZE,
                                     compress_statistics=False, quant_type=spec.method, quant_storage=torch.uint8)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer = layer.to(device)  # Params4bit quantizes on its first move to a real device
    layer.support_avx512bf16_for_cpu = False
    return layer


def _linear8bit(linear: nn.Linear) -> nn.Module:
    bnb = _bnb()
    device = linear.weight.device
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
    # Int8Params quantizes only on a move *from the CPU*: a weight already on CUDA would stay unquantized (its
    # forward then runs in fp16 and its stored "codes" are the raw weights; measured on an H200: 0.8% of codes
    # agreed with the CPU path). Build from a CPU copy so the move below always quantizes.
    layer.weight = bnb.nn.Int8Params(linear.weight.detach().to("cpu", copy=True), requires_grad=False,
                                     has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(device)  # Int8Params quantizes (row-wise absmax of the fp16 weight) on the move


class _DropInt8CastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_cast_warning() -> None:
    # LLM.int8 casts fp32/bf16 activations to fp16 by design; bnb logs that on every forward, flooding evaluation.
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastWarning) for f in logger.filters):
        logger.addFilter(_DropInt8CastWarning())


def quantize_model(model: nn.Module, spec: QuantSpec) -> nn.Module:
    if spec.method == "int8":
        _quiet_int8_cast_warning()
    compute_dtype = next(model.parameters()).dtype
    for name in target_linear_names(model):
        module = model.get_submodule(name)
        if not is_plain_linear(module):
            continue
        linear = as_linear(module)
        new = _linear8bit(linear) if spec.method == "int8" else _linear4bit(linear, spec, compute_dtype)
        set_submodule(model, name, new)
    return model


def disable_cpu_repacking(model: nn.Module) -> None:
    bnb = _bnb()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def codes_from_module(module: nn.Module) -> torch.Tensor | None:
    """The stored codes of a bnb layer ([out, in], int64), or None for other modules."""
    bnb = _bnb()
    if isinstance(module, bnb.nn.Linear4bit):
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise UserError("bitsandbytes repacked this 4-bit layer for its CPU kernel on a forward pass; "
                            "read codes before running the model (or set support_avx512bf16_for_cpu=False)")
        return _unpack_4bit(module.weight.data, state.shape.numel()).reshape(state.shape)
    if isinstance(module, bnb.nn.Linear8bitLt):
        return module.weight.data.to(torch.int64)
    return None


def save_quantized(model_dir: Path, spec: QuantSpec, out_dir: Path, device: torch.device) -> nn.Module:
    """Write a standard HF bitsandbytes folder: reload `model_dir` with BitsAndBytesConfig and save it."""
    _bnb()
    if spec.method == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.method,
                                    bnb_4bit_use_double_quant=False,
                                    bnb_4bit_compute_dtype=resolve_dtype("auto", device))
    dtype = resolve_dtype("auto", device)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=config, dtype=dtype,
                                                 device_map=str(device), use_safetensors=True)
    disable_cpu_repacking(model)
    model.save_pretrained(str(out_dir))
    return model


def load_serialised(model_dir: Path, device: torch.device) -> nn.Module:
    """Load a folder written by `save_quantized` (config.json carries its quantization_config)."""
    _bnb()
    dtype = resolve_dtype("auto", device)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, device_map=str(device),
                                                 use_safetensors=True)
    disable_cpu_repacking(model)
    _quiet_int8_cast_warning()
    model.eval()
    return model
