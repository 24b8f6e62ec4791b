"""Quantization spec strings -> a typed `QuantSpec`.

Grammar (one regular expression per method, chosen by the text before the first ':'):
    fp | none                      full precision (no-op), so precision lists like ["fp", "int8", "nf4"] are uniform
    bf16                           the block linears' weights cast to bfloat16 (computed in fp32)
    rtn:w{bits}[g{group}][:sym]    round-to-nearest, bits 2..8; per-channel without g; asymmetric unless :sym
    nf4 | fp4                      bitsandbytes 4-bit, block size 64, double quantization off
    int8                           bitsandbytes LLM.int8 (row-wise absmax, outlier threshold 6.0)
    hqq:w{bits}g{group}            HQQ, bits 2/3/4/8
    gptq:w{bits}[g{group}]         GPTQ through llmcompressor (separate environment), bits 2..8, symmetric
    awq:w{bits}[g{group}]          AWQ through llmcompressor (separate environment), bits 2..8, asymmetric
    gguf:{type}                    llama.cpp's own quantizer and runtime (optional extra), any type name in
                                   GGUF_TYPES: q8_0, q6_k, q5_k_m, q4_k_m, q4_0, q3_k_m, iq4_xs, ... f32 / f16
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic_core import core_schema

from qrunlearn.errors import UserError

Method = Literal["fp", "bf16", "rtn", "nf4", "fp4", "int8", "hqq", "gptq", "awq", "gguf"]

BNB_BLOCKSIZE = 64  # the paper's bitsandbytes setting (block 64, no double quantization)
RTN_BITS = range(2, 9)
HQQ_BITS = (2, 3, 4, 8)
GPTQ_BITS = range(2, 9)

_RTN_RE = re.compile(r"w(\d+)(?:g(\d+))?(:sym)?")
_HQQ_RE = re.compile(r"w(\d+)g(\d+)")
_GPTQ_RE = re.compile(r"w(\d+)(?:g(\d+))?")
# llama.cpp's file types (enum llama_ftype in llama.h, vendored by llama-cpp-python 0.3.36) by the name its
# `llama-quantize` tool takes, lower case. The types llama.cpp refuses to make without an importance matrix are
# listed apart: qrunlearn computes none.
GGUF_TYPES: dict[str, int] = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_s": 11,
    "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18,
    "iq3_xs": 22, "iq4_nl": 25, "iq3_s": 26, "iq3_m": 27, "iq4_xs": 30, "bf16": 32,
}
GGUF_NEEDS_IMATRIX = ("iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq1_s", "iq1_m", "q2_k_s")
SPEC_HELP = ("fp, bf16, rtn:w{bits}[g{group}][:sym], nf4, fp4, int8, hqq:w{bits}g{group}, gptq:w{bits}[g{group}], "
             "awq:w{bits}[g{group}], gguf:{llama.cpp type}")
# Quantized by llmcompressor with calibration data (retain text), in its own environment (make gptq-venv).
CALIBRATED_METHODS = ("gptq", "awq")
# Their groups run along each weight row, so a group size must divide every quantized layer's input width
# (bitsandbytes' blocks run over the flattened weight; llama.cpp falls back per tensor on its own).
ROW_GROUP_METHODS = ("rtn", "hqq", *CALIBRATED_METHODS)
# What fake quantization (quant.fake) reproduces bit for bit, so what quantization-aware training can train against.
TRAINABLE_METHODS = ("rtn", "nf4", "fp4")
TRAINABLE_HELP = "rtn:w{bits}[g{group}][:sym], nf4, fp4"


@dataclass(frozen=True)
class QuantSpec:
    """A parsed spec. `bits`/`group_size` are None for full precision; `group_size` None means per-channel
    (one scale per output row); for bitsandbytes it is the block size over the flattened weight."""

    method: Method
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool = False
    gguf_type: str | None = None  # llama.cpp's type name, for method "gguf" only

    @property
    def label(self) -> str:
        if self.method in ("fp", "bf16", "nf4", "fp4", "int8"):
            return self.method
        if self.method == "gguf":
            return f"gguf:{self.gguf_type}"
        group = f"g{self.group_size}" if self.group_size is not None else ""
        sym = ":sym" if self.method == "rtn" and self.symmetric else ""
        return f"{self.method}:w{self.bits}{group}{sym}"

    @property
    def row_group(self) -> int | None:
        """The group size each quantized layer's input width must be a multiple of (None: no such rule)."""
        return self.group_size if self.method in ROW_GROUP_METHODS else None

    @property
    def is_noop(self) -> bool:
        return self.method == "fp"

    def __str__(self) -> str:
        return self.label

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        """As a pydantic field: validated from its spec string (or taken as is), written back as its label, so a
        config holds a parsed spec and its JSON holds the text a user would type."""
        return core_schema.no_info_plain_validator_function(
            _validate, serialization=core_schema.plain_serializer_function_ser_schema(str, when_used="always"),
            json_schema_input_schema=core_schema.str_schema())


def _validate(value: object) -> QuantSpec:
    if not isinstance(value, (str, QuantSpec)):
        raise ValueError(f"a quantization spec is a string ({SPEC_HELP}), not {type(value).__name__}")
    try:
        return parse_spec(value)
    except UserError as err:
        raise ValueError(str(err)) from None


FULL_PRECISION = QuantSpec(method="fp")


def is_full_precision(spec: str | QuantSpec) -> bool:
    """True for the no-op precision ("fp" / "none")."""
    return parse_spec(spec).is_noop


def _bits(spec: str, text: str, allowed) -> int:
    bits = int(text)
    if bits not in allowed:
        choices = ", ".join(str(b) for b in allowed)
        raise UserError(f"quantization spec '{spec}': {bits} bits not supported (choose from {choices})")
    return bits


def _group(spec: str, text: str | None) -> int | None:
    if text is None:
        return None
    group = int(text)
    if group < 1:
        raise UserError(f"quantization spec '{spec}': group size must be positive")
    return group


def parse_spec(spec: str | QuantSpec) -> QuantSpec:
    """Parse a spec string (see the module docstring); raise UserError with the accepted grammar otherwise."""
    if isinstance(spec, QuantSpec):
        return spec
    text = spec.strip().lower()
    method, _, rest = text.partition(":")
    if method in ("fp", "none") and not rest:
        return QuantSpec(method="fp")
    if method in ("nf4", "fp4") and not rest:
        return QuantSpec(method="nf4" if method == "nf4" else "fp4", bits=4, group_size=BNB_BLOCKSIZE, symmetric=True)
    if method == "bf16" and not rest:
        return QuantSpec(method="bf16", bits=16, group_size=None, symmetric=True)
    if method == "int8" and not rest:
        return QuantSpec(method="int8", bits=8, group_size=None, symmetric=True)
    if method == "rtn" and (m := _RTN_RE.fullmatch(rest)):
        return QuantSpec("rtn", _bits(spec, m[1], RTN_BITS), _group(spec, m[2]), symmetric=m[3] is not None)
    if method == "hqq" and (m := _HQQ_RE.fullmatch(rest)):
        return QuantSpec("hqq", _bits(spec, m[1], HQQ_BITS), _group(spec, m[2]), symmetric=False)
    if method == "gptq" and (m := _GPTQ_RE.fullmatch(rest)):
        return QuantSpec("gptq", _bits(spec, m[1], GPTQ_BITS), _group(spec, m[2]), symmetric=True)
    if method == "awq" and (m := _GPTQ_RE.fullmatch(rest)):  # AWQ's usual scheme: asymmetric (W4A16_ASYM)
        return QuantSpec("awq", _bits(spec, m[1], GPTQ_BITS), _group(spec, m[2]), symmetric=False)
    if method == "gguf":
        return _gguf_spec(spec, rest)
    raise UserError(f"unknown quantization spec '{spec}' (expected one of: {SPEC_HELP})")


def _gguf_spec(spec: str, name: str) -> QuantSpec:
    if name in GGUF_NEEDS_IMATRIX:
        raise UserError(f"quantization spec '{spec}': llama.cpp makes {name} only with an importance matrix, which "
                        "qrunlearn does not compute; choose a k-quant (q4_k_m, q3_k_m, ...) or iq4_xs")
    if name not in GGUF_TYPES:
        raise UserError(f"quantization spec '{spec}': unknown llama.cpp type '{name}' "
                        f"(choose from {', '.join(GGUF_TYPES)})")
    bits = int(re.search(r"\d+", name)[0])  # type: ignore[index]  # every name holds its bit width
    return QuantSpec("gguf", bits=bits, group_size=None, symmetric=False, gguf_type=name)


def trainable_spec(spec: QuantSpec | str) -> QuantSpec:
    """The parsed spec when fake quantization supports it; one-line UserError otherwise."""
    parsed = parse_spec(spec)
    if parsed.method not in TRAINABLE_METHODS:
        raise UserError(f"quantization-aware unlearning supports {TRAINABLE_HELP}; not {parsed.label}")
    return parsed
