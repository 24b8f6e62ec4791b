"""Typed results of an experiment: what each cell writes to `cells/<id>/result.json`, and what the report reads.

Every record is a pydantic model, written with `model_dump_json` and read back with `model_validate_json`, so a
truncated or hand-edited file is detected on load instead of failing later on a missing key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qrunlearn.config import ExperimentConfig
from qrunlearn.eval.effect import Estimate, PrecisionEffect, Verdict
from qrunlearn.eval.items import ItemScores, item_scores
from qrunlearn.eval.mia import privleak
from qrunlearn.eval.muse import PRIVLEAK_SCORE, EvalResult
from qrunlearn.quant.survival import FirstOrder, SurvivalOverall, SurvivalReport
from qrunlearn.unlearn.config import UnlearnConfig
from qrunlearn.unlearn.records import EpochRecord, StepLoss
from qrunlearn.unlearn.strategy import Strategy


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
    """One model evaluated at one precision, with the per-item numbers that paired intervals resample (the texts
    stay in the per-item logs, which `qrunlearn eval` writes). Records written before items were kept read with
    `items` None."""

    metrics: Metrics
    intervals: dict[str, tuple[float, float]] = Field(default_factory=dict)
    items: ItemScores | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    wall_seconds: float = 0.0

    def fill_privleak(self, retrain_auc: float | None) -> "EvalRecord":
        """PrivLeak from this record's AUC and the retrain model's, where it is missing: it depends on the reference,
        which is often known only after the record (the retrain model's own evaluation, a cached one)."""
        auc = self.metrics.privleak_auc
        if retrain_auc and auc is not None and self.metrics.privleak is None:
            self.metrics.privleak = privleak(auc, retrain_auc)
        return self

    @classmethod
    def of(cls, result: EvalResult, wall_seconds: float) -> "EvalRecord":
        return cls(metrics=Metrics(**result.metrics), intervals=result.intervals,
                   items=item_scores(result.items, PRIVLEAK_SCORE), timings=result.timings,
                   settings=result.settings, wall_seconds=wall_seconds)


class RetrainReference(BaseModel):
    """What PrivLeak and MUSE's selection rule compare against: the retrain model's Min-40% AUC and KnowMem-forget."""

    auc: float | None
    knowmem_f: float | None
    source: str  # "retrain model at <path>", "preset (MUSE-News)", "config value"
    auc_measured: float | None = None  # the retrain model's own AUC when a preset overrides it
    retrain_identity: str | None = None  # `models.identity` of the retrain model measured (a lone cell's cache)


class SurvivalRecord(SurvivalReport):
    plot: str | None = None  # the per-layer PNG, relative to the experiment folder
    first_order: FirstOrder | None = None  # on the forget answers' NLL; None when the config turns it off


class ReferenceCellResult(BaseModel):
    """Cell 0: the target and retrain models evaluated at every precision."""

    kind: Literal["reference"] = "reference"
    cell: str
    target: str
    retrain: str | None
    retrain_reference: RetrainReference
    # what the target was, by content (`models.identity`): every unlearning cell of a report must have been scored
    # against this one. None in results written before it was recorded.
    target_identity: str | None = None
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
    seconds: float  # training, summed over every session of a resumed run (`UnlearnResult.seconds`)


class UnlearnCellResult(BaseModel):
    """One (method, strategy) cell: the unlearning run, its evaluation at every precision and the survival of its
    update under every quantizer."""

    kind: Literal["unlearn"] = "unlearn"
    cell: str
    method: str
    strategy: Strategy
    seed: int = 0  # the unlearning run's seed
    unlearn_config: UnlearnConfig
    unlearn: UnlearnSummary
    retrain_reference: RetrainReference
    evals: dict[str, EvalRecord]  # by precision
    survival: dict[str, SurvivalRecord]  # by quantized precision
    target_identity: str | None = None  # the target it unlearned from, by content (None: written before it was)
    wall_seconds: float = 0.0
    meta: dict[str, Any] = Field(default_factory=dict)


CellResult = ReferenceCellResult | UnlearnCellResult


def read_cell(path: Path, kind: type[BaseModel]) -> Any:
    """A finished cell's result, or None when the file is missing, truncated or not a valid result."""
    try:
        return kind.model_validate_json(path.read_text())
    except (OSError, ValueError, ValidationError):
        return None


class Effects(BaseModel):
    """The precision-matched forgetting of one row, per metric with a forgetting direction (`eval.effect`); None
    where the evaluations hold no per-item numbers for it."""

    knowmem_f: PrecisionEffect | None = None
    verbmem_f: PrecisionEffect | None = None
    knowmem_f_answer_nll: PrecisionEffect | None = None
    nll_privleak_forget: PrecisionEffect | None = None
    privleak_auc: PrecisionEffect | None = None


class Row(BaseModel):
    """One table row: a reference model, or a (method, strategy) over its seeds, at one precision."""

    group: str = ""  # method-strategy ("" for the reference models)
    method: str
    strategy: str  # "" for the reference models
    precision: str
    seeds: list[int] = Field(default_factory=list)  # the unlearning seeds averaged
    cells: list[str] = Field(default_factory=list)  # their cell ids
    metrics: Metrics  # mean over the seeds
    anchor: str | None = None  # the precision the retained shares are relative to (fp, or a QAT cell's quantizer)
    deployed: bool = True  # False: a quantization-aware cell's full-precision model (trained, never shipped)
    effects: Effects | None = None  # unlearning rows
    verdict: Verdict | None = None  # from the KnowMem-forget reversion, at quantized deployed rows
    survival: SurvivalOverall | None = None  # mean over the seeds
    first_order_reversion: float | None = None  # 1 - g.dQ / g.dW, mean over the seeds (`quant.survival.first_order`)


class StrategyFinding(BaseModel):
    """One strategy at one quantized precision, over the grid's methods (each method's seeds pooled)."""

    strategy: str
    precision: str
    groups: int  # (method, strategy) rows at this precision
    measurable: int  # rows whose anchor forgetting interval excludes 0
    reverted: int  # measurable rows whose KnowMem-forget reversion interval lies above the threshold
    holds: int  # ... below it
    inconclusive: int
    at_retrain: int = 0  # ... whose KnowMem-forget at Q is measurably no higher than the retrain model's at Q
    without_items: int = 0  # rows from evaluations without per-item scores (written before they were kept)
    median_reversion_knowmem_f: float | None  # over the measurable rows
    median_reversion_answer_nll: float | None
    mean_utility_anchor: float | None
    mean_utility_q: float | None


class Correlation(BaseModel):
    """Rank correlation (Spearman) between a diagnostic and a measured reversion over (unlearning cell, quantized
    precision) pairs with a measurable effect; the interval is Fisher's z with Fieller's variance 1.06 / (n - 3)."""

    diagnostic: str
    target: str
    rho: Estimate
    pairs: int
    predicts: bool  # the interval excludes 0
    precision: str | None = None  # None: pairs of every quantizer pooled; else the pairs of that quantizer only


class StrategyDifference(BaseModel):
    """One strategy's reversion minus the baseline strategy's (full fine-tuning), same method and quantizer, per
    forgetting metric, paired over items (`eval.effect.reversion_difference`): < 0, the strategy gives back less.
    None where either side's forgetting is not measurable at its anchor."""

    method: str  # "pooled": both sides pooled over `methods` (`eval.effect.pooled_reversion`)
    strategy: str
    baseline: str
    precision: str
    knowmem_f: Estimate | None = None
    knowmem_f_answer_nll: Estimate | None = None
    nll_privleak_forget: Estimate | None = None
    methods: list[str] | None = None
    at_retrain: list[str] = []  # pooled methods left out of the KnowMem-forget figure: at retrain on either side


class PooledReversion(BaseModel):
    """One strategy's reversion at one quantizer pooled over the grid's methods (`eval.effect.pooled_reversion`):
    the share of the methods' summed forgetting that the quantizer gives back, 95% interval over the items (one
    resample for every method's models) and each method's seeds. None where the summed forgetting is not
    measurable at the anchor."""

    strategy: str
    precision: str
    methods: list[str]
    runs: int  # unlearning runs pooled: methods x seeds
    at_retrain: list[str] = []  # methods left out of the KnowMem-forget figure: at the retrain model's level here
    knowmem_f: Estimate | None = None
    knowmem_f_answer_nll: Estimate | None = None
    nll_privleak_forget: Estimate | None = None


class ExperimentResults(BaseModel):
    """`results.json`: every number of the grid, and the one-sentence finding."""

    config: ExperimentConfig
    versions: dict[str, str | None]
    git_commit: str | None
    references: ReferenceCellResult
    cells: list[UnlearnCellResult]
    rows: list[Row]
    low_precision: str | None
    reversion_threshold: float
    strategies: list[StrategyFinding]
    correlations: list[Correlation]
    finding: str
    differences: list[StrategyDifference] = []  # each strategy against full fine-tuning, per quantizer
    pooled: list[PooledReversion] = []  # each strategy's reversion over the grid's methods, per quantizer
    bootstrap_seconds: float = 0.0  # the report's paired bootstrap, all rows
