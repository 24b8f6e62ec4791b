"""Strategies against "quantization undoes unlearning", as typed settings: which weights move (full or LoRA) and
any of SURE, QUAIL and quantization-aware unlearning on top. One `Strategy` is parsed once where it enters (YAML,
CLI, API) and travels as an object; `UnlearnConfig.strategy` holds it, the recipe asks it for its learning rate
and builds its run-time hooks from it (`unlearn.strategy_hooks`: the forward context, the update rule, the extra
term), and the memory estimate asks it what it keeps.

Grammar: tokens joined by "+": `full` or `lora` (the weights that move; `full` when neither is given), then any of

    sure[:percentile=P][:lr_factor=F]            SURE: only the rows most salient for the forget loss, a larger lr
    quail[:SPEC][:weight=W][:margin=M]           QUAIL's logit hinge; SPEC the deployment quantizer (default nf4)
    qat:SPEC[:mix=X]                             the losses on the model fake-quantized to SPEC

A part holding "=" is a setting, the others form the spec. Examples: full, lora, sure, sure:percentile=90, quail,
quail:rtn:w4g64:weight=2, qat:nf4, lora+qat:nf4:mix=0.5. `Strategy.label` writes the canonical text back (settings
only where they differ from their defaults), and cell ids are built from it.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from qrunlearn.errors import UserError
from qrunlearn.io import slug
from qrunlearn.quant.spec import TRAINABLE_HELP, TRAINABLE_METHODS, QuantSpec, parse_spec, trainable_spec

Adapter = Literal["full", "lora"]
DefaultsName = Literal["paper", "tiny"]

STRATEGY_HELP = ("full | lora, then any of sure[:percentile=P][:lr_factor=F] | quail[:SPEC][:weight=W][:margin=M] | "
                 "qat:SPEC[:mix=X], joined with + (e.g. lora+qat:nf4)")

# SURE updates 5% of rows at a multiple of the default set's learning rate: 10x in their paper's regime ("paper"); on
# the built-in tiny model 3x, chosen by benchmarks/sweep_strategies.py (RESULTS.md, "The fixes head to head").
SURE_LR_FACTOR: dict[DefaultsName, float] = {"tiny": 3.0, "paper": 10.0}
NF4 = parse_spec("nf4")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def changed(self) -> list[str]:
        """'name=value' for each setting that differs from its default, in field order."""
        out = []
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if name != "spec" and value != field.default:
                out.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
        return out


class Sure(_Settings):
    """SURE (Zhang et al., ICLR 2025): update only the weight rows whose forget-gradient norm is at or above the
    `percentile` (one threshold over all rows), at `lr_factor` times the learning rate (`unlearn.saliency`)."""

    percentile: float = Field(95.0, gt=0, lt=100, description="rows at or above this percentile of forget-gradient "
                                                               "norms move (90-99 in the paper)")
    lr_factor: Optional[float] = Field(None, gt=0, description="learning-rate multiplier; None: the default set's "
                                                              "(paper 10, tiny 3)")


class Quail(_Settings):
    """QUAIL (Mishra and Mehreen, 2026): a hinge keeping each forget position's logits `margin` away from the
    original model's (`unlearn.quail`)."""

    spec: QuantSpec = Field(NF4, description="the deployment quantizer whose step sets the margin")
    weight: float = Field(1.0, gt=0, description="weight of the hinge against the forget loss")
    margin: str = Field(
        "logit", pattern=r"^(logit|weight|[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?)$",
        description="'logit' = half the logit shift that quantizing the original model causes on the forget set; "
                    "'weight' = half the mean weight quantization step (the paper's words, taken literally); or a "
                    "number")

    @model_validator(mode="after")
    def _measurable_margin(self) -> "Quail":
        if self.margin == "logit" and self.spec.method not in TRAINABLE_METHODS:
            raise ValueError(f"the logit margin quantizes the model with {self.spec.label} in plain torch, which "
                             f"supports {TRAINABLE_HELP}; give one of those or margin=weight")
        return self


class Qat(_Settings):
    """Quantization-aware unlearning: the losses computed with the block linears fake-quantized to `spec`
    (straight-through gradients; LoRA: Q(W0 + s B A)), `quant.fake`."""

    spec: QuantSpec = Field(description="rtn:w{b}[g{g}][:sym], nf4 or fp4")
    mix: float = Field(1.0, gt=0, le=1, description="weight of the quantized forward's loss; the rest goes to a "
                                                    "full-precision forward's (1 = quantized only)")

    @field_validator("spec")
    @classmethod
    def _trainable(cls, spec: QuantSpec) -> QuantSpec:
        try:
            return trainable_spec(spec)
        except UserError as err:
            raise ValueError(str(err)) from None


class Strategy(BaseModel):
    """Which weights move and what is added to plain unlearning. Validated from its text (see the module
    docstring) or from its fields; written as its label, the text that reads back as the same strategy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter: Adapter = Field("full", description="full fine-tuning, or LoRA adapters merged at the end")
    sure: Optional[Sure] = None
    quail: Optional[Quail] = None
    qat: Optional[Qat] = None

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, raw: Any) -> Any:
        return _parse_fields(raw) if isinstance(raw, str) else raw

    @model_serializer
    def _as_label(self) -> str:
        return self.label

    @model_validator(mode="after")
    def _compatible(self) -> "Strategy":
        if self.sure is not None and self.adapter == "lora":
            raise ValueError("SURE selects rows of the full weights; it does not combine with lora")
        return self

    @property
    def label(self) -> str:
        """The canonical text: `Strategy.parse(s.label) == s`."""
        plain = self.sure is None and self.quail is None and self.qat is None
        tokens: list[str] = [self.adapter] if self.adapter == "lora" or plain else []
        if self.sure is not None:
            tokens.append(":".join(["sure", *self.sure.changed()]))
        if self.quail is not None:
            spec = [] if self.quail.spec == NF4 else [self.quail.spec.label]
            tokens.append(":".join(["quail", *spec, *self.quail.changed()]))
        if self.qat is not None:
            tokens.append(":".join(["qat", self.qat.spec.label, *self.qat.changed()]))
        return "+".join(tokens)

    @property
    def slug(self) -> str:
        """The label as a file-name part: 'lora+qat:nf4' -> 'lora_qat_nf4'."""
        return slug(self.label)

    def __str__(self) -> str:
        return self.label

    @classmethod
    def parse(cls, text: "str | Strategy") -> "Strategy":
        """The strategy a text names; a bad one is a one-line UserError quoting it."""
        if isinstance(text, Strategy):
            return text
        try:
            return cls.model_validate(text)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            message = first["msg"].removeprefix("Value error, ")
            raise UserError(f"strategy '{text}': " + (f"{where}: {message}" if where else message)) from None

    # ---- what the recipe and the estimate ask ----------------------------------------------------------------
    def for_defaults(self, defaults: DefaultsName) -> "Strategy":
        """With SURE's learning-rate factor fixed by the default set when the strategy left it open."""
        if self.sure is None or self.sure.lr_factor is not None:
            return self
        return self.model_copy(update={"sure": self.sure.model_copy(update={"lr_factor": SURE_LR_FACTOR[defaults]})})

    def lr(self, base_lr: float) -> float:
        """The learning rate the optimizer uses: SURE multiplies the configured one (paper's factor when open)."""
        if self.sure is None:
            return base_lr
        return base_lr * (self.sure.lr_factor if self.sure.lr_factor is not None else SURE_LR_FACTOR["paper"])


def _parse_fields(text: str) -> dict[str, Any]:
    """The grammar of the module docstring -> Strategy's fields; ValueError naming the token otherwise."""
    fields: dict[str, Any] = {}
    seen: set[str] = set()
    for token in text.split("+"):
        head, *parts = token.strip().split(":")
        if head in seen or head not in ("full", "lora", "sure", "quail", "qat"):
            raise ValueError(f"'{token}' is not one of {STRATEGY_HELP}")
        seen.add(head)
        settings = dict(part.split("=", 1) for part in parts if "=" in part)
        spec = ":".join(part for part in parts if "=" not in part)
        if head in ("full", "lora"):
            if parts:
                raise ValueError(f"'{head}' takes no settings")
            fields["adapter"] = head
        elif head == "sure":
            if spec:
                raise ValueError("'sure' takes settings (sure:percentile=90), not a spec")
            fields["sure"] = settings
        elif head == "quail":
            fields["quail"] = {**({"spec": spec} if spec else {}), **settings}
        else:
            if not spec:
                raise ValueError("qat needs the deployment spec, e.g. qat:nf4")
            fields["qat"] = {"spec": spec, **settings}
    if {"full", "lora"} <= seen:
        raise ValueError("choose full or lora, not both")
    return fields
