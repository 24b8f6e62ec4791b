"""GPTQ (and the llmcompressor calling code AWQ shares) through llmcompressor, an optional extra that lives in its
own environment (`make gptq-venv` installs `.[gptq]` into .venv-gptq; llmcompressor pins another transformers, so
it is never installed into .venv).

Calibration: the first `n_samples` documents of the retain split in file order, tokenized and cut to `max_length`,
passed unshuffled (shuffled calibration makes two runs on the same model differ in ~15% of codes) with a fixed seed.
After `oneshot`, each block linear carries `weight_scale` / `weight_zero_point`; its codes are read back with
compressed-tensors' own `quantize`. Exercised in .venv-gptq (tests/quant/test_llmcompressor.py), not in the default
environment, where those tests skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from qrunlearn.errors import MissingDependencyError, UserError
from qrunlearn.quant.common import check_group_divides
from qrunlearn.quant.spec import QuantSpec


@dataclass(frozen=True)
class Calibration:
    """Calibration texts (the retain split, in order) and how to feed them."""

    texts: tuple[str, ...]
    tokenizer: PreTrainedTokenizerBase
    n_samples: int = 128
    max_length: int = 512
    seed: int = 0


def llmcompressor_parts():
    """(oneshot, QuantizationArgs, QuantizationScheme) from llmcompressor, or the one-line install hint."""
    try:
        import llmcompressor  # noqa: F401
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor import oneshot
    except ImportError:
        raise MissingDependencyError("llmcompressor", "GPTQ / AWQ (run `make gptq-venv`, then use "
                                     ".venv-gptq/bin/qrunlearn)", "gptq") from None
    return oneshot, QuantizationArgs, QuantizationScheme


def is_available() -> bool:
    try:
        llmcompressor_parts()
    except MissingDependencyError:
        return False
    return True


def weight_scheme(spec: QuantSpec):
    """The block linears' weight-only integer scheme of `spec` (lm_head is left out by the caller's ignore list)."""
    _, QuantizationArgs, QuantizationScheme = llmcompressor_parts()
    weights = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric,
                               strategy="group" if spec.group_size else "channel", group_size=spec.group_size)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def run_oneshot(model: nn.Module, spec: QuantSpec, recipe: list, calibration: Calibration | None) -> nn.Module:
    """llmcompressor's one-shot pass of `recipe` over the calibration texts, seeded and unshuffled."""
    oneshot, _, _ = llmcompressor_parts()
    if calibration is None or not calibration.texts:
        raise UserError(f"{spec.label}: needs calibration text (pass a corpus with a retain split: --data DIR)")
    check_group_divides(model, spec.group_size, spec.label)
    from datasets import Dataset

    texts = list(calibration.texts[: calibration.n_samples])
    encoded = calibration.tokenizer(texts, truncation=True, max_length=calibration.max_length)
    dataset = Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    torch.manual_seed(calibration.seed)
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=calibration.max_length,
            num_calibration_samples=len(texts), shuffle_calibration_samples=False)
    return model


def quantize_model(model: nn.Module, spec: QuantSpec, calibration: Calibration | None) -> nn.Module:
    llmcompressor_parts()
    from llmcompressor.modifiers.quantization import GPTQModifier

    return run_oneshot(model, spec, [GPTQModifier(config_groups=weight_scheme(spec), ignore=["lm_head"])],
                       calibration)


def codes_from_module(module: nn.Module) -> torch.Tensor | None:
    if not hasattr(module, "weight_scale") or not hasattr(module, "quantization_scheme"):
        return None
    from compressed_tensors.quantization.lifecycle.forward import quantize

    scheme: Any = module.quantization_scheme  # llmcompressor's QuantizationScheme, attached by `oneshot`
    args = scheme.weights
    zero = getattr(module, "weight_zero_point", None)
    return quantize(module.weight, module.weight_scale, zero, args).to(torch.int64)
