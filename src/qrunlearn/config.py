"""The typed experiment config (`qrunlearn run CONFIG.yaml`). Unknown keys are errors, so a typo never
silently falls back to a default."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qrunlearn.errors import UserError

MethodName = Literal["ga_gdr", "ga_klr", "npo_gdr", "npo_klr", "ga", "npo", "simnpo", "simnpo_gdr", "simnpo_klr"]
AdapterName = Literal["full", "lora"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SynthData(_Strict):
    size: Literal["tiny", "small", "medium"] = "small"
    seed: int = 0


class DataConfig(_Strict):
    """Exactly one of: `synth` (the built-in benchmark), `path` (a MUSE folder), `hub` (an HF dataset id)."""

    synth: SynthData | None = None
    path: Path | None = None
    hub: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        chosen = [name for name in ("synth", "path", "hub") if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise ValueError(f"give one data source, not {' and '.join(chosen)}")
        return self

    @property
    def is_synth(self) -> bool:
        return self.path is None and self.hub is None


class ModelsConfig(_Strict):
    """Target and retrain models. Left empty with synth data, `qrunlearn target` builds them."""

    target: str | None = None
    retrain: str | None = None
    size: Literal["tiny", "small"] = "small"
    epochs: int | None = None
    retrain_auc: float | Literal["news", "books"] | None = Field(
        default=None, description="Use this retrain AUC instead of evaluating a retrain model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class EvalSettings(_Strict):
    metrics: tuple[str, ...] = ("verbmem_f", "knowmem_f", "knowmem_r", "privleak")
    limit: int | None = None
    batch_size: int = 64
    bootstrap: int = 1000


class UnlearnOverrides(_Strict):
    """Per-cell hyperparameters layered over the chosen defaults. None = keep the default."""

    lr: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    max_length: int | None = None
    alpha: float | None = None
    gamma: float | None = None
    beta: float | None = None
    delta: float | None = None
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None


class ExperimentConfig(_Strict):
    name: str = "built-in benchmark"
    seed: int = 0
    data: DataConfig = DataConfig(synth=SynthData())
    models: ModelsConfig = ModelsConfig()
    methods: tuple[MethodName, ...] = ("ga_gdr", "ga_klr", "npo_gdr", "npo_klr")
    adapters: tuple[AdapterName, ...] = ("full", "lora")
    precisions: tuple[str, ...] = ("fp", "int8", "nf4")
    defaults: Literal["tiny", "paper"] = "tiny"
    hparams: dict[str, UnlearnOverrides] = Field(
        default_factory=dict,
        description="Overrides keyed 'method/adapter' (e.g. 'npo_klr/lora'), 'method' or 'adapter'.")
    eval: EvalSettings = EvalSettings()
    select_epoch: bool = Field(
        default=False, description="MUSE's rule: keep the first epoch whose KnowMem-forget <= the retrain's.")


def split_method(method: str) -> tuple[str, str]:
    """'npo_klr' -> ('npo', 'klr'); 'ga' -> ('ga', 'none')."""
    base, _, reg = method.partition("_")
    return base, (reg or "none")


def load_config(path: Path | str | None) -> ExperimentConfig:
    if path is None:
        return ExperimentConfig()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}: invalid YAML{where}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise UserError(f"{path}: field '{field}': {first['msg']}") from None
