"""The typed experiment config (`qrunlearn run CONFIG.yaml`). Unknown keys are errors, so a typo never
silently falls back to a default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from qrunlearn.errors import UserError, validation_message
from qrunlearn.eval.config import EvalConfig
from qrunlearn.io import read_json_object
from qrunlearn.quant.spec import QuantSpec, parse_spec
from qrunlearn.targets.config import FinetuneRecipe
from qrunlearn.unlearn.config import (
    LEGACY_STRATEGY_FIELDS,
    METHODS,
    REGS,
    TUNABLE,
    DefaultsName,
    UnlearnConfig,
    rename_older_kernel_switch,
)
from qrunlearn.unlearn.strategy import STRATEGY_HELP, Strategy

METHOD_NAME_HELP = f"a forget objective ({', '.join(METHODS)}), alone or with a retain term after '_' " \
                   f"({', '.join(r for r in REGS if r != 'none')}), e.g. npo_gdr, rmu_act"


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
    """Target and retrain models: given (`target`, `retrain`), or built by `qrunlearn target` from the data: the
    built-in tiny Llama from scratch (`size`, `epochs`), or a pretrained `base` fine-tuned with `finetune`."""

    target: str | None = None
    retrain: str | None = None
    base: str | None = Field(None, description="a pretrained causal LM to fine-tune into target and retrain")
    finetune: FinetuneRecipe = FinetuneRecipe()
    size: Literal["tiny", "small"] = "small"
    epochs: int | None = None
    retrain_auc: float | Literal["news", "books"] | None = Field(
        default=None, description="Use this retrain AUC instead of evaluating a retrain model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


def _optional(name: str) -> tuple[Any, Any]:
    """An UnlearnConfig field as an optional override: same type and constraints, default None."""
    field = UnlearnConfig.model_fields[name]
    annotation = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
    return Optional[annotation], Field(None, description=field.description)


def _older_overrides(raw: Any) -> Any:
    """Results and resolved configs written before strategies were typed list every override, unset ones as null,
    among them the flat strategy fields and `onednn_linear`: those read again (`onednn_linear` is `cpu_kernels`).
    A strategy field that was set belongs to an entry of `strategies` now, and is named as an error."""
    if not isinstance(raw, dict) or not ({"onednn_linear", *LEGACY_STRATEGY_FIELDS} & raw.keys()):
        return raw
    raw = rename_older_kernel_switch(raw)
    for name in LEGACY_STRATEGY_FIELDS:
        if raw.pop(name, None) is not None:
            raise ValueError(f"'{name}' is a strategy's setting now: give it in `strategies` ({STRATEGY_HELP})")
    return raw


# typed Any: a **-spread mapping is checked against every keyword of create_model, not only the field definitions
_OVERRIDE_FIELDS: dict[str, Any] = {name: _optional(name) for name in TUNABLE}
UnlearnOverrides = create_model(
    "UnlearnOverrides", __base__=_Strict, __doc__="Per-cell settings layered over the chosen defaults; None keeps "
    "the default. Generated from `UnlearnConfig` (the fields in `unlearn.config.TUNABLE`).",
    __validators__={"_older_overrides": model_validator(mode="before")(_older_overrides)},  # type: ignore[dict-item]
    **_OVERRIDE_FIELDS)


class ExperimentConfig(_Strict):
    name: str = "built-in benchmark"
    seed: int = Field(0, description="seeds the target and retrain training, the bootstrap and, without `seeds`, "
                                     "the unlearning cells")
    seeds: tuple[StrictInt, ...] | None = Field(
        None, min_length=1, description="run every unlearning cell once per seed (data order, LoRA initialisation); "
                                        "cell ids end in -s<seed>; the table shows the mean over seeds with an "
                                        "interval over seeds and items")
    first_order: bool = Field(
        True, description="with each cell's survival diagnostics, the first-order prediction of its reversion: one "
                          "backward pass of the forget answers' NLL at the unlearned model (its gradient is held in "
                          "float32 on the host: 28 GB for a 7B model; false skips it)")
    reversion_threshold: float = Field(
        0.25, gt=0.0, lt=1.0, description="a cell reverts when its KnowMem-forget reversion interval lies above "
                                          "this share, holds when it lies below, else it is inconclusive")
    data: DataConfig = DataConfig(synth=SynthData())
    models: ModelsConfig = ModelsConfig()
    methods: tuple[str, ...] = Field(("ga_gdr", "ga_klr", "npo_gdr", "npo_klr"), min_length=1,
                                     description=f"one grid axis: {METHOD_NAME_HELP}")
    strategies: tuple[Strategy, ...] = Field((Strategy(), Strategy(adapter="lora")), min_length=1,
                                             description=f"one grid axis: {STRATEGY_HELP}")
    precisions: tuple[QuantSpec, ...] = Field(tuple(parse_spec(p) for p in ("fp", "int8", "nf4")), min_length=1,
                                              description="the precisions every model is evaluated at")
    defaults: DefaultsName = "tiny"
    hparams: dict[str, UnlearnOverrides] = Field(  # type: ignore[valid-type]
        default_factory=dict,
        description="Overrides keyed 'method/strategy' (e.g. 'npo_klr/lora'), 'method', 'strategy' or the adapter "
                    "('full' / 'lora': every strategy on it); the most specific wins.")
    eval: EvalConfig = EvalConfig(batch_size=64)
    select_epoch: bool = Field(
        default=False, description="MUSE's rule: keep the first epoch whose KnowMem-forget <= the retrain's.")
    stop_at_selected: bool = Field(
        default=True, description="with select_epoch, stop unlearning at the selected epoch (the later ones are "
                                  "never evaluated); false trains every epoch (keep_epoch_models keeps their models)")
    keep_epoch_models: bool = Field(
        default=False, description="with select_epoch, keep every epoch's model in the cell; false keeps the "
                                   "evaluated (selected) epoch and the final model only, once the cell is done "
                                   "(each epoch is a full model: 0.5 GB for SmolLM2-135M in fp32, 13.5 GB for a "
                                   "7B in bf16)")

    @model_validator(mode="before")
    @classmethod
    def _adapters_are_strategies(cls, raw: object) -> object:
        """`adapters:` (full / lora) was this axis's name before strategies existed; it still reads."""
        if isinstance(raw, dict) and "adapters" in raw:
            if "strategies" in raw:
                raise ValueError("give 'strategies' or its old name 'adapters', not both")
            raw = {**raw, "strategies": raw["adapters"]}
            del raw["adapters"]
        return raw

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat: {list(seeds)}")
        return seeds

    @property
    def unlearn_seeds(self) -> tuple[int, ...]:
        return self.seeds if self.seeds is not None else (self.seed,)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        for name in methods:
            forget, reg = split_method(name)
            if forget not in METHODS or reg not in REGS or name.endswith("_none"):
                raise ValueError(f"unknown method '{name}': {METHOD_NAME_HELP}")
            if reg == "act" and forget != "rmu":
                raise ValueError(f"method '{name}': the act retain term is RMU's (rmu_act)")
        return no_repeats(methods)

    @field_validator("strategies", "precisions")
    @classmethod
    def _distinct(cls, values: tuple) -> tuple:
        return no_repeats(values)

    def eval_config(self) -> EvalConfig:
        """The evaluation settings with the experiment's seed as the bootstrap seed."""
        return self.eval.model_copy(update={"seed": self.seed})

    def unlearn_config(self, method: str, strategy: Strategy | str, seed: int | None = None) -> UnlearnConfig:
        """A cell's settings: the default set of its strategy, then the overrides from least to most specific
        (adapter, strategy, method, method/strategy); `seed` defaults to the config's. The strategy's own rules
        (SURE's lr factor) apply on top of whatever lr the overrides give."""
        forget, reg = split_method(method)
        parsed = Strategy.parse(strategy)
        base = UnlearnConfig.defaults(self.defaults, forget, reg, parsed)  # type: ignore[arg-type]
        updates: dict[str, object] = {"seed": self.seed if seed is None else seed}
        label = parsed.label
        for key in dict.fromkeys((parsed.adapter, label, method, f"{method}/{label}")):
            override = self.hparams.get(key)
            if override is not None:
                updates.update(override.model_dump(exclude_none=True))
        if self.select_epoch:
            updates["save_every_epoch"] = True
        try:
            return UnlearnConfig.model_validate({**base.model_dump(), **updates})
        except ValidationError as err:
            raise UserError(f"cell {method}-{label}: {validation_message(err)}") from None


def no_repeats(values: tuple) -> tuple:
    """Cells and table rows are named by these labels: two entries with one label would overwrite each other."""
    labels = [str(value) for value in values]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"listed twice: {', '.join(repeated)}")
    return values


def split_method(method: str) -> tuple[str, str]:
    """'npo_klr' -> ('npo', 'klr'); 'ga' -> ('ga', 'none')."""
    base, _, reg = method.partition("_")
    return base, (reg or "none")


RESOLVED_CONFIG_FILE = "config.resolved.json"  # beside a run's results: the config it ran, seed, versions, commit


def load_resolved_config(out: Path) -> ExperimentConfig | None:
    """The config a run folder was run with (None when it has none: it was never prepared)."""
    path = out / RESOLVED_CONFIG_FILE
    if not path.is_file():
        return None
    record = read_json_object(path)
    if not isinstance(record.get("config"), dict):
        raise UserError(f"{path}: field 'config': expected the run's config as a mapping")
    try:
        return ExperimentConfig.model_validate(record["config"])
    except ValidationError as err:
        raise UserError(f"{path}: the run's config, {validation_message(err)}") from None


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
        raise UserError(f"{path}: {validation_message(err)}") from None
