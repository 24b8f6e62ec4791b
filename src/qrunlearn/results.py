"""Typed results of an experiment: what each cell writes to `cells/<id>/result.json`, and what the report reads.

Every record is a pydantic model, written with `model_dump_json` and read back with `model_validate_json`, so a
truncated or hand-edited file is detected on load instead of failing later on a missing key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qrunlearn.config import ExperimentConfig
from qrunlearn.eval.muse import EvalResult
from qrunlearn.quant.survival import SurvivalOverall, SurvivalReport
from qrunlearn.unlearn.config import UnlearnConfig
from qrunlearn.unlearn.records import EpochRecord, StepLoss


class Metrics(BaseModel):
    """One evaluation's numbers: MUSE's headline metrics (ROUGE-L x 100, PrivLeak in %), the PrivLeak AUC, mean
    per-token NLL on each privleak split; the MIA AUCs (`mia_loss`, `mia_min_k_20`, ...) ride along as extras."""

    model_config = ConfigDict(extra="allow")

    verbmem_f: float | None = None
    verbmem_f_recall: float | None = None
    knowmem_f: float | None = None
    knowmem_f_recall: float | None = None
    knowmem_f_answer_nll: float | None = None
    knowmem_r: float | None = None
    knowmem_r_recall: float | None = None
    privleak: float | None = None
    privleak_auc: float | None = None
    nll_privleak_forget: float | None = None
    nll_privleak_retain: float | None = None
    nll_privleak_holdout: float | None = None


class EvalRecord(BaseModel):
    """One model evaluated at one precision (without the per-item logs, which `qrunlearn eval` writes)."""

    metrics: Metrics
    intervals: dict[str, tuple[float, float]] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    wall_seconds: float = 0.0

    @classmethod
    def of(cls, result: EvalResult, wall_seconds: float) -> "EvalRecord":
        return cls(metrics=Metrics(**result.metrics), intervals=result.intervals, timings=result.timings,
                   settings=result.settings, wall_seconds=wall_seconds)


class RetrainReference(BaseModel):
    """What PrivLeak and MUSE's selection rule compare against: the retrain model's Min-40% AUC and KnowMem-forget."""

    auc: float | None
    knowmem_f: float | None
    source: str  # "retrain model at <path>", "preset (MUSE-News)", "config value"
    auc_measured: float | None = None  # the retrain model's own AUC when a preset overrides it


class SurvivalRecord(SurvivalReport):
    plot: str | None = None  # the per-layer PNG, relative to the experiment folder


class ReferenceCellResult(BaseModel):
    """Cell 0: the target and retrain models evaluated at every precision."""

    kind: Literal["reference"] = "reference"
    cell: str
    target: str
    retrain: str | None
    retrain_reference: RetrainReference
    target_evals: dict[str, EvalRecord]  # by precision
    retrain_evals: dict[str, EvalRecord]  # by precision; empty without a retrain model
    wall_seconds: float = 0.0
    meta: dict[str, Any] = Field(default_factory=dict)


class UnlearnSummary(BaseModel):
    model_dir: str  # the model evaluated: the run's final model, or the epoch MUSE's rule selected
    adapter_dir: str | None
    epochs_run: int
    stopped_reason: str
    losses: list[StepLoss]
    epochs: list[EpochRecord]
    selected_epoch: int | None
    seconds: float


class UnlearnCellResult(BaseModel):
    """One (method, strategy) cell: the unlearning run, its evaluation at every precision and the survival of its
    update under every quantizer."""

    kind: Literal["unlearn"] = "unlearn"
    cell: str
    method: str
    strategy: str
    adapter: str
    unlearn_config: UnlearnConfig
    unlearn: UnlearnSummary
    retrain_reference: RetrainReference
    evals: dict[str, EvalRecord]  # by precision
    survival: dict[str, SurvivalRecord]  # by quantized precision
    wall_seconds: float = 0.0
    meta: dict[str, Any] = Field(default_factory=dict)


CellResult = ReferenceCellResult | UnlearnCellResult


def read_cell(path: Path, kind: type[BaseModel]) -> Any:
    """A finished cell's result, or None when the file is missing, truncated or not a valid result."""
    try:
        return kind.model_validate_json(path.read_text())
    except (OSError, ValueError, ValidationError):
        return None


class Reversion(BaseModel):
    """The share of the unlearning effect a quantizer undoes, (m_Q - m_fp) / (m_target - m_fp), for KnowMem-forget
    and for the forget answers' NLL. Unlearning moves m from the target's value to m_fp (KnowMem down, NLL up); 1
    means the quantized model is back at the target, 0 that quantization changed nothing, < 0 that it forgot more.
    None when the cell barely moved the metric (less than `report.MIN_EFFECT`)."""

    knowmem_f: float | None = None
    answer_nll: float | None = None


class Row(BaseModel):
    """One table row: a model (reference or cell) at one precision."""

    cell: str = ""
    method: str
    strategy: str  # "" for the reference models
    precision: str
    metrics: Metrics
    reversion: Reversion | None = None  # quantized cell rows
    survival: SurvivalOverall | None = None


class StrategyFinding(BaseModel):
    """One strategy at one quantized precision, over the grid's methods."""

    strategy: str
    precision: str
    cells: int
    reverted: int  # cells whose KnowMem-forget reversion >= report.REVERT_SHARE
    median_reversion_knowmem_f: float | None
    median_reversion_answer_nll: float | None
    mean_utility_fp: float | None
    mean_utility_q: float | None


class Correlation(BaseModel):
    """Rank correlation (Spearman) between a survival diagnostic and a measured reversion over the grid's
    (cell, quantized precision) pairs."""

    diagnostic: str
    target: str
    rho: float | None
    pairs: int


class ExperimentResults(BaseModel):
    """`results.json`: every number of the grid, and the one-sentence finding."""

    config: ExperimentConfig
    versions: dict[str, str | None]
    git_commit: str | None
    references: ReferenceCellResult
    cells: list[UnlearnCellResult]
    rows: list[Row]
    low_precision: str | None
    strategies: list[StrategyFinding]
    correlations: list[Correlation]
    finding: str
