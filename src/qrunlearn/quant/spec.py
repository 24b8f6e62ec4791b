"""Quantization spec strings -> a typed `QuantSpec`.

Grammar (one regular expression per method, chosen by the text before the first ':'):
    fp | none                      full precision (no-op), so precision lists like ["fp", "int8", "nf4"] are uniform
    bf16                           the block linears' weights cast to bfloat16 (computed in fp32)
    rtn:w{bits}[g{group}][:sym]    round-to-nearest, bits 2..8; per-channel without g; asymmetric unless :sym
    nf4 | fp4                      bitsandbytes 4-bit, block size 64, double quantization off
    int8                           bitsandbytes LLM.int8 (row-wise absmax, outlier threshold 6.0)
    hqq:w{bits}g{group}            HQQ, bits 2/3/4/8
    gptq:w{bits}[g{group}]         GPTQ through llmcompressor (separate environment), bits 2..8, symmetric
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic_core import core_schema

from qrunlearn.errors import UserError

Method = Literal["fp", "bf16", "rtn", "nf4", "fp4", "int8", "hqq", "gptq"]

BNB_BLOCKSIZE = 64  # the paper's bitsandbytes setting (block 64, no double quantization)
RTN_BITS = range(2, 9)
HQQ_BITS = (2, 3, 4, 8)
GPTQ_BITS = range(2, 9)

_RTN_RE = re.compile(r"w(\d+)(?:g(\d+))?(:sym)?")
_HQQ_RE = re.compile(r"w(\d+)g(\d+)")
_GPTQ_RE = re.compile(r"w(\d+)(?:g(\d+))?")
SPEC_HELP = "fp, bf16, rtn:w{bits}[g{group}][:sym], nf4, fp4, int8, hqq:w{bits}g{group}, gptq:w{bits}[g{group}]"
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

    @property
    def label(self) -> str:
        if self.method in ("fp", "bf16", "nf4", "fp4", "int8"):
            return self.method
        group = f"g{self.group_size}" if self.group_size is not None else ""
        sym = ":sym" if self.method == "rtn" and self.symmetric else ""
        return f"{self.method}:w{self.bits}{group}{sym}"

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
    raise UserError(f"unknown quantization spec '{spec}' (expected one of: {SPEC_HELP})")


def trainable_spec(spec: QuantSpec | str) -> QuantSpec:
    """The parsed spec when fake quantization supports it; one-line UserError otherwise."""
    parsed = parse_spec(spec)
    if parsed.method not in TRAINABLE_METHODS:
        raise UserError(f"quantization-aware unlearning supports {TRAINABLE_HELP}; not {parsed.label}")
    return parsed
