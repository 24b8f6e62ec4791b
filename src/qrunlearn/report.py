"""Turn an experiment's finished cells into results.json, table.md / table.csv, plots and report.md.

Takes typed cell results (`qrunlearn.results`), never the experiment object: `experiment -> report` is the only
direction of dependency. Every sentence of the report is computed from the numbers it reports.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

from pydantic import BaseModel
from scipy.stats import spearmanr

from qrunlearn.config import ExperimentConfig
from qrunlearn.eval.bootstrap import LEVEL
from qrunlearn.eval.effect import (
    FORGETTING_METRICS,
    HEADLINE,
    METRIC,
    Arm,
    Estimate,
    PrecisionEffect,
    Verdict,
    at_retrain,
    has_items,
    pooled_reversion,
    precision_effect,
    reversion_difference,
    verdict,
)
from qrunlearn.eval.items import ItemScores
from qrunlearn.io import atomic_write_json, atomic_write_text, git_commit, package_versions
from qrunlearn.plotting import pyplot, save_figure
from qrunlearn.quant import FULL_PRECISION, QuantSpec, is_full_precision
from qrunlearn.quant.survival import SurvivalOverall
from qrunlearn.results import (
    Correlation,
    Effects,
    EvalRecord,
    ExperimentResults,
    Metrics,
    PooledReversion,
    ReferenceCellResult,
    Row,
    StrategyDifference,
    StrategyFinding,
    SurvivalRecord,
    UnlearnCellResult,
)
from qrunlearn.unlearn.strategy import Strategy

# table column -> metric field
COLUMNS = {"VerbMem": "verbmem_f", "KnowMem-forget": "knowmem_f", "PrivLeak": "privleak", "Utility": "knowmem_r"}
EXTRA_COLUMNS = {"answer NLL": "knowmem_f_answer_nll", "forget NLL": "nll_privleak_forget",
                 "Min-40% AUC": "privleak_auc"}
# the precision-matched figures table.md shows (table.csv and results.json hold every forgetting metric's)
EFFECT_COLUMNS = {"forgetting KnowMem-f": ("knowmem_f", "effect"), "reversion KnowMem-f": ("knowmem_f", "reversion"),
                  "reversion answer NLL": ("knowmem_f_answer_nll", "reversion"),
                  "reversion forget NLL": ("nll_privleak_forget", "reversion")}
RETRAIN_GAP_COLUMN = "KnowMem-f - retrain"
# diagnostics computed before deployment, from the weights (and, first-order, the forget loss's gradient):
# column -> name; `_diagnostics` reads them
DIAGNOSTICS = {"relative error": "relative_error", "codes changed": "codes_changed_frac",
               "|dW| / step": "mean_abs_dw_in_steps"}
FIRST_ORDER = "first_order_reversion"  # 1 - g.dQ / g.dW: a predicted reversion, printed only where it predicts
FIRST_ORDER_COLUMN = "predicted answer-NLL reversion (1st order)"
REVERSION_TARGETS = ("knowmem_f", "knowmem_f_answer_nll")  # the measured reversions the diagnostics are tested on
GPU_COMMAND = "accelerate launch -m qrunlearn run configs/muse-news-llama2-7b.yaml --out runs/muse-news"


def _fmt(value: float | str | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{round(value, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.00"
    return str(value)


def _fmt_estimate(estimate: Estimate | None, digits: int = 2) -> str:
    if estimate is None or estimate.value is None:
        return "-"
    if estimate.low is None or estimate.high is None:
        return _fmt(estimate.value, digits)
    return f"{_fmt(estimate.value, digits)} [{_fmt(estimate.low, digits)}, {_fmt(estimate.high, digits)}]"


def low_precision(precisions: Sequence[QuantSpec]) -> str | None:
    """The lowest-bit quantized precision of the grid (the one the paper's claim is about)."""
    quantized = [p for p in precisions if not p.is_noop]
    if not quantized:
        return None
    return min(quantized, key=lambda p: p.bits or 0).label


def anchor_precision(strategy: Strategy, precisions: Sequence[str]) -> str | None:
    """Where a strategy's forgetting is judged from: full precision, or for a quantization-aware strategy the
    grid's precision it was trained for (None when the grid does not evaluate it there). `precisions` are
    labels, as records key them."""
    anchor = FULL_PRECISION if strategy.qat is None else strategy.qat.spec
    return anchor.label if anchor.label in precisions else None


def _diagnostics(survival: SurvivalRecord) -> dict[str, float | None]:
    values: dict[str, float | None] = {key: getattr(survival.overall, key) for key in DIAGNOSTICS.values()}
    values[FIRST_ORDER] = survival.first_order.predicted_reversion if survival.first_order is not None else None
    return values


# ---- rows -----------------------------------------------------------------------------------------------------
def _mean_record(records: Sequence[BaseModel], kind: type[BaseModel]) -> Any:
    """Field-wise mean of records (None where any record lacks the field); integer fields rounded."""
    dumps = [record.model_dump() for record in records]
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for dump in dumps for k in dump):
        values = [dump.get(key) for dump in dumps]
        numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) < len(values):  # None, text or a nested record: kept only where every record agrees
            merged[key] = values[0] if all(v == values[0] for v in values) else None
        elif all(isinstance(v, int) for v in values):
            merged[key] = int(round(statistics.fmean(numbers)))
        else:
            merged[key] = statistics.fmean(numbers)
    return kind.model_validate(merged)


@dataclass(frozen=True)
class _Group:
    """One (method, strategy): its cells, one per seed."""

    method: str
    strategy: Strategy
    cells: tuple[UnlearnCellResult, ...]

    @property
    def id(self) -> str:
        return f"{self.method}-{self.strategy.slug}"


def _groups(cells: Sequence[UnlearnCellResult]) -> list[_Group]:
    by_key: dict[tuple[str, str], list[UnlearnCellResult]] = {}
    for cell in cells:
        by_key.setdefault((cell.method, cell.strategy.label), []).append(cell)
    return [_Group(method, found[0].strategy, tuple(found)) for (method, _), found in by_key.items()]


@dataclass(frozen=True)
class Measurement:
    """What every precision-matched comparison needs: the reference evaluations and the bootstrap settings."""

    references: ReferenceCellResult
    resamples: int
    seed: int
    threshold: float

    def items(self, evals: dict[str, EvalRecord], precision: str) -> ItemScores | None:
        record = evals.get(precision)
        return record.items if record is not None else None


def effects_at(measure: Measurement, cells: Sequence[UnlearnCellResult], precision: str,
               anchor: str | None) -> Effects:
    """Every forgetting metric of `cells` (one per seed) at `precision`, shares relative to `anchor` (None: no
    share, as at the anchor itself or on a row that is not deployed)."""
    refs = measure.references
    target = measure.items(refs.target_evals, precision)
    unlearned = [cell.evals[precision].items for cell in cells]
    anchor_target = measure.items(refs.target_evals, anchor) if anchor is not None else None
    anchor_unlearned = [cell.evals[anchor].items for cell in cells] if anchor is not None else []
    retrain = measure.items(refs.retrain_evals, precision)
    found: dict[str, PrecisionEffect] = {}
    for metric in FORGETTING_METRICS:
        if not all(has_items(metric, s) for s in (target, *unlearned)):
            continue
        anchored = anchor is not None and all(has_items(metric, s) for s in (anchor_target, *anchor_unlearned))
        found[metric.name] = precision_effect(
            metric, target, unlearned,  # type: ignore[arg-type]
            anchor_target if anchored else None, anchor_unlearned if anchored else None,  # type: ignore[arg-type]
            retrain if has_items(metric, retrain) else None, measure.resamples, measure.seed)
    return Effects(**found)


def _row_verdict(precision: str, anchor: str | None, deployed: bool, anchor_effects: Effects | None,
                 effects: Effects, threshold: float) -> Verdict | None:
    if not deployed:
        return "not deployed"
    if precision == anchor:
        return "anchor"
    if anchor is None or precision == FULL_PRECISION.label:
        return None
    anchor_effect = anchor_effects.knowmem_f.effect if anchor_effects and anchor_effects.knowmem_f else None
    share = effects.knowmem_f.reversion if effects.knowmem_f is not None else None
    gap = effects.knowmem_f.retrain_gap if effects.knowmem_f is not None else None
    return verdict(anchor_effect, share, threshold, gap)


def collect_rows(measure: Measurement, cells: list[UnlearnCellResult], precisions: list[str]) -> list[Row]:
    references = measure.references
    rows = []
    for name, evals in (("target", references.target_evals), ("retrain", references.retrain_evals)):
        for precision in precisions:
            if precision in evals:
                rows.append(Row(method=name, strategy="", precision=precision, metrics=evals[precision].metrics))
    for group in _groups(cells):
        anchor = anchor_precision(group.strategy, precisions)
        qat = group.strategy.qat is not None
        anchor_effects = effects_at(measure, group.cells, anchor, None) if anchor is not None else None
        for precision in precisions:
            deployed = not (qat and precision == FULL_PRECISION.label)
            shares_from = anchor if deployed and precision != anchor else None
            effects = anchor_effects if precision == anchor and anchor_effects is not None else effects_at(
                measure, group.cells, precision, shares_from)
            survivals = [cell.survival[precision] for cell in group.cells if precision in cell.survival]
            predicted = [_diagnostics(survival)[FIRST_ORDER] for survival in survivals]
            rows.append(Row(
                group=group.id, method=group.method, strategy=group.strategy.label, precision=precision,
                seeds=[cell.seed for cell in group.cells], cells=[cell.cell for cell in group.cells],
                metrics=_mean_record([cell.evals[precision].metrics for cell in group.cells], Metrics),
                anchor=anchor, deployed=deployed, effects=effects,
                verdict=_row_verdict(precision, anchor, deployed, anchor_effects, effects, measure.threshold),
                survival=_mean_record([s.overall for s in survivals], SurvivalOverall)
                if len(survivals) == len(group.cells) else None,
                first_order_reversion=statistics.fmean(predicted)  # type: ignore[arg-type]
                if predicted and None not in predicted and len(predicted) == len(group.cells) else None))
    return rows


DIFFERENCE_METRICS = ("knowmem_f", "knowmem_f_answer_nll", "nll_privleak_forget")  # `StrategyDifference`'s fields
BASELINE = Strategy.parse("full")


def _arm(measure: Measurement, cells: Sequence[UnlearnCellResult], precision: str, anchor: str) -> Arm | None:
    refs = measure.references
    target_q, target_a = measure.items(refs.target_evals, precision), measure.items(refs.target_evals, anchor)
    if target_q is None or target_a is None or any(p not in c.evals for c in cells for p in (precision, anchor)):
        return None
    return Arm(target_q=target_q, unlearned_q=[c.evals[precision].items for c in cells],  # type: ignore[misc]
               target_anchor=target_a, unlearned_anchor=[c.evals[anchor].items for c in cells])  # type: ignore[misc]


def _per_metric(estimate: Callable[..., Estimate | None], *sides: Sequence[Arm], measure: Measurement,
                metrics: Sequence[str] = ()) -> dict[str, Estimate | None]:
    """`estimate(metric, *sides, resamples, seed)` for each of `metrics` (default DIFFERENCE_METRICS) whose item
    scores every model of the sides' arms has; none where a side has no arm."""
    if not all(sides):
        return {}
    models = [scores for side in sides for arm in side for scores in arm.models()]
    return {name: estimate(METRIC[name], *sides, measure.resamples, measure.seed)
            for name in (metrics or DIFFERENCE_METRICS) if all(has_items(METRIC[name], scores) for scores in models)}


def _above_the_floor(estimate: Callable[..., Estimate | None], every: Sequence[Sequence[Arm]],
                     kept: Sequence[Sequence[Arm]], measure: Measurement) -> dict[str, Estimate | None]:
    """`_per_metric` over the sides' arms of `every` method, but the bounded headline metric over `kept`'s only (the
    methods not at the retrain model's level, whose floor would pass the target's own loss off as reversion)."""
    unbounded = [name for name in DIFFERENCE_METRICS if name != HEADLINE.name]
    return {**_per_metric(estimate, *every, measure=measure, metrics=unbounded),
            **_per_metric(estimate, *kept, measure=measure, metrics=[HEADLINE.name])}


def _quantizers(strategy: Strategy, precisions: list[str]) -> list[str]:
    """Where a strategy's reversion is measured: every deployed precision but full precision and its anchor."""
    anchor = anchor_precision(strategy, precisions)
    return [] if anchor is None else [p for p in precisions if p not in (anchor, FULL_PRECISION.label)]


def strategy_differences(measure: Measurement, cells: list[UnlearnCellResult],
                         precisions: list[str]) -> list[StrategyDifference]:
    """Every strategy's reversion against full fine-tuning's, same method, at each quantizer where both are
    deployed and neither is anchored (a quantization-aware strategy's own quantizer is its anchor)."""
    groups = _groups(cells)
    baselines = {g.method: g for g in groups if g.strategy == BASELINE}
    base_anchor = anchor_precision(BASELINE, precisions)
    found = []
    for group in groups:
        base = baselines.get(group.method)
        anchor = anchor_precision(group.strategy, precisions)
        if base is None or group is base or anchor is None or base_anchor is None:
            continue
        for precision in _quantizers(group.strategy, precisions):
            if precision == base_anchor:
                continue
            arms = _arm(measure, base.cells, precision, base_anchor), _arm(measure, group.cells, precision, anchor)
            if arms[0] is None or arms[1] is None:
                continue
            estimates = _per_metric(reversion_difference, [arms[0]], [arms[1]], measure=measure)
            found.append(StrategyDifference(method=group.method, strategy=group.strategy.label,
                                            baseline=BASELINE.label, precision=precision, **estimates))
    return found


def _method_arms(measure: Measurement, groups: Sequence[_Group], precision: str,
                 anchor: str) -> dict[str, Arm]:
    """Each method's arm (the groups of one strategy) at `precision` against `anchor`, by method, in method order;
    methods without the evaluations are left out."""
    found = {g.method: _arm(measure, g.cells, precision, anchor) for g in sorted(groups, key=lambda g: g.method)}
    return {method: arm for method, arm in found.items() if arm is not None}


def pooled_reversions(measure: Measurement, cells: list[UnlearnCellResult], precisions: list[str],
                      rows: Sequence[Row]) -> tuple[list[PooledReversion], list[StrategyDifference]]:
    """Each strategy's reversion at each quantizer pooled over the grid's methods (two or more), and beside full
    fine-tuning's, the pooled difference over the methods both have: the grid's question (does this quantizer give
    back a strategy's forgetting?) with every run's items behind one interval, where one method's is too wide.

    A method whose row (`rows`) is *at retrain* at the quantizer is left out of the pooled KnowMem-forget figure and
    named: a bounded metric at its floor keeps only the share of its effect that the quantizer leaves the target, so
    the floored method would add the target's own loss to the pool as if it were reversion. The NLL metrics have no
    floor and pool every method."""
    floored = {(row.method, row.strategy, row.precision) for row in rows if row.verdict == "at retrain"}
    by_strategy: dict[Strategy, list[_Group]] = {}
    for group in _groups(cells):
        by_strategy.setdefault(group.strategy, []).append(group)
    base_anchor = anchor_precision(BASELINE, precisions)
    base_arms = {} if base_anchor is None else {
        precision: _method_arms(measure, by_strategy.get(BASELINE, []), precision, base_anchor)
        for precision in _quantizers(BASELINE, precisions)}
    pooled, differences = [], []
    for strategy, members in by_strategy.items():
        anchor = anchor_precision(strategy, precisions)
        for precision in _quantizers(strategy, precisions):
            arms = _method_arms(measure, members, precision, anchor)  # type: ignore[arg-type]
            if len(arms) < 2:
                continue
            level = [method for method in arms if (method, strategy.label, precision) in floored]
            pooled.append(PooledReversion(
                strategy=strategy.label, precision=precision, methods=list(arms), at_retrain=level,
                runs=sum(len(arm.unlearned_q) for arm in arms.values()),
                **_above_the_floor(pooled_reversion, [list(arms.values())],
                                   [[arm for method, arm in arms.items() if method not in level]], measure)))
            base = base_arms.get(precision, {})
            shared = [method for method in arms if method in base]
            if strategy == BASELINE or len(shared) < 2:
                continue
            level = [m for m in shared if {(m, strategy.label, precision), (m, BASELINE.label, precision)} & floored]
            kept = [m for m in shared if m not in level]
            differences.append(StrategyDifference(
                method="pooled", methods=shared, at_retrain=level, strategy=strategy.label, baseline=BASELINE.label,
                precision=precision,
                **_above_the_floor(reversion_difference, [[base[m] for m in shared], [arms[m] for m in shared]],
                                   [[base[m] for m in kept], [arms[m] for m in kept]], measure)))
    return pooled, differences


# ---- tables ---------------------------------------------------------------------------------------------------
def _effect(row: Row, metric: str) -> PrecisionEffect | None:
    return getattr(row.effects, metric) if row.effects is not None else None


def _effect_part(row: Row, metric: str, part: str) -> Estimate | None:
    found = _effect(row, metric)
    return getattr(found, part) if found is not None else None


HEADERS = ["Method", "Strategy", "Seeds", "Precision", *COLUMNS, *EXTRA_COLUMNS, *EFFECT_COLUMNS, "verdict",
           RETRAIN_GAP_COLUMN, *DIAGNOSTICS]


def table_markdown(rows: list[Row], predicted: bool = False) -> str:
    """The table; `predicted` adds the first-order predicted reversion (only where it has been shown to predict)."""
    headers = HEADERS + ([FIRST_ORDER_COLUMN] if predicted else [])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        precision = row.precision if row.deployed else f"{row.precision} (not deployed)"
        cells = [row.method, row.strategy or "-", str(len(row.seeds)) if row.seeds else "-", precision,
                 *(_fmt(getattr(row.metrics, key)) for key in COLUMNS.values()),
                 *(_fmt(getattr(row.metrics, key), 3) for key in EXTRA_COLUMNS.values()),
                 *(_fmt_estimate(_effect_part(row, metric, part)) for metric, part in EFFECT_COLUMNS.values()),
                 row.verdict or "-", _fmt_estimate(_effect_part(row, "knowmem_f", "retrain_gap"), 1),
                 *(_fmt(getattr(row.survival, key), 3) if row.survival is not None else "-"
                   for key in DIAGNOSTICS.values()),
                 *([_fmt(row.first_order_reversion)] if predicted else [])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows: list[Row]) -> str:
    """Every number of every row: the metrics, then per forgetting metric its effect, retained share, reversion
    and gap to the retrain model, each as value, low, high."""
    effect_fields = [f"{metric.name}_{part}{end}" for metric in FORGETTING_METRICS
                     for part in ("effect", "retained", "reversion", "retrain_gap") for end in ("", "_low", "_high")]
    fields = ["method", "strategy", "seeds", "precision", "anchor", "deployed", *COLUMNS.values(),
              *EXTRA_COLUMNS.values(), *effect_fields, "verdict", *DIAGNOSTICS.values(), FIRST_ORDER]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        values: dict[str, object] = {"method": row.method, "strategy": row.strategy,
                                     "seeds": " ".join(map(str, row.seeds)), "precision": row.precision,
                                     "anchor": row.anchor or "", "deployed": row.deployed, "verdict": row.verdict or ""}
        values.update({key: getattr(row.metrics, key) for key in (*COLUMNS.values(), *EXTRA_COLUMNS.values())})
        for metric in FORGETTING_METRICS:
            for part in ("effect", "retained", "reversion", "retrain_gap"):
                estimate = _effect_part(row, metric.name, part)
                for end, key in (("", "value"), ("_low", "low"), ("_high", "high")):
                    values[f"{metric.name}_{part}{end}"] = getattr(estimate, key) if estimate is not None else None
        values.update({key: getattr(row.survival, key) if row.survival is not None else None
                       for key in DIAGNOSTICS.values()})
        values[FIRST_ORDER] = row.first_order_reversion
        writer.writerow(values)
    return buffer.getvalue()


# ---- findings -------------------------------------------------------------------------------------------------
def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _reversion_value(row: Row, metric: str) -> float | None:
    estimate = _effect_part(row, metric, "reversion")
    return estimate.value if estimate is not None else None


# the verdicts of rows with a measurable effect at the anchor (counted by the findings, drawn by the reversion plot)
MEASURABLE = ("reverted", "holds", "at retrain", "inconclusive")


def strategy_findings(rows: list[Row], strategies: Sequence[str], precisions: Sequence[str]) -> list[StrategyFinding]:
    """Per strategy and quantized precision: how many (method) rows revert, hold or stay inconclusive, among those
    with a measurable effect, and the utility kept (mean over the methods)."""
    anchor_utility = {row.group: row.metrics.knowmem_r for row in rows if row.group and row.verdict == "anchor"}
    findings = []
    for strategy in strategies:
        for precision in precisions:
            group = [r for r in rows if r.strategy == strategy and r.precision == precision
                     and r.verdict in (*MEASURABLE, "no effect", "no items")]
            if not group:
                continue
            measurable = [r for r in group if r.verdict in MEASURABLE]
            findings.append(StrategyFinding(
                strategy=strategy, precision=precision, groups=len(group), measurable=len(measurable),
                reverted=sum(r.verdict == "reverted" for r in measurable),
                holds=sum(r.verdict == "holds" for r in measurable),
                inconclusive=sum(r.verdict == "inconclusive" for r in measurable),
                at_retrain=sum(r.verdict == "at retrain" for r in measurable),
                without_items=sum(r.verdict == "no items" for r in group),
                median_reversion_knowmem_f=_median([_reversion_value(r, "knowmem_f") for r in measurable]),
                median_reversion_answer_nll=_median([_reversion_value(r, "knowmem_f_answer_nll") for r in measurable]),
                mean_utility_anchor=_mean([anchor_utility.get(r.group) for r in group]),
                mean_utility_q=_mean([r.metrics.knowmem_r for r in group])))
    return findings


def rank_correlation(xs: Sequence[float], ys: Sequence[float], level: float = LEVEL) -> Estimate:
    """Spearman's rho with a Fisher-z interval (Fieller, Hartley and Pearson's variance 1.06 / (n - 3)); no
    interval under 4 pairs, no rho when either side is constant."""
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return Estimate(value=None)
    rho = float(spearmanr(xs, ys).statistic)
    if len(xs) < 4:
        return Estimate(value=rho)
    z = math.atanh(max(-0.999999, min(0.999999, rho)))
    half = NormalDist().inv_cdf(0.5 + level / 2) * math.sqrt(1.06 / (len(xs) - 3))
    return Estimate(value=rho, low=math.tanh(z - half), high=math.tanh(z + half))


Pairs = dict[tuple[str, str], list[tuple[float, float]]]  # (diagnostic, reversion metric) -> (value, measured)


def diagnostic_pairs_by_precision(measure: Measurement, cells: list[UnlearnCellResult],
                                  precisions: list[str]) -> dict[str, Pairs]:
    """Every (unlearning cell, quantized deployed precision among `precisions`) pair whose own anchor effect is
    measurable (each seed its own pair), grouped by that precision: each diagnostic's value beside the measured
    reversion, per reversion metric. A survival record at a precision not listed is left out (a reused grid's other
    quantizers), and so is a KnowMem-forget pair at the retrain model's level: its share there is the target's own
    quantization loss (the floor, `eval.effect.verdict`), which a diagnostic of the update would be credited with
    predicting."""
    by_precision: dict[str, Pairs] = {}
    for cell in cells:
        anchor = anchor_precision(cell.strategy, precisions)
        if anchor is None:
            continue
        anchor_effects = effects_at(measure, [cell], anchor, None)
        for precision, survival in cell.survival.items():
            if precision == anchor or precision not in cell.evals or precision not in precisions:
                continue
            effects = effects_at(measure, [cell], precision, anchor)
            pairs = by_precision.setdefault(precision, {})
            for target in REVERSION_TARGETS:
                measured = getattr(effects, target)
                at_anchor = getattr(anchor_effects, target)
                if measured is None or measured.reversion is None or measured.reversion.value is None \
                        or at_anchor is None or at_anchor.effect.excludes(0.0) != "above":
                    continue
                if target == HEADLINE.name and at_retrain(measured.retrain_gap, HEADLINE.direction):
                    continue
                for key, value in _diagnostics(survival).items():
                    if value is not None:
                        pairs.setdefault((key, target), []).append((value, measured.reversion.value))
    return by_precision


def pooled_pairs(by_precision: dict[str, Pairs]) -> Pairs:
    """The pairs of every precision together (a rank correlation does not depend on their order)."""
    pooled: Pairs = {}
    for pairs in by_precision.values():
        for key, found in pairs.items():
            pooled.setdefault(key, []).extend(found)
    return pooled


def correlations(measure: Measurement, cells: list[UnlearnCellResult], precisions: list[str]) -> list[Correlation]:
    """Does a diagnostic computed before deployment predict the reversion measured by evaluating the quantized
    models? One rank correlation per (diagnostic, reversion metric) over `diagnostic_pairs_by_precision` of every
    quantizer, and, with several quantizers, one within each: pooled pairs can rank the quantizers (int8 moves more
    codes and gives back less than a 4-bit one) without ranking the cells a user deploys with one of them."""
    by_precision = diagnostic_pairs_by_precision(measure, cells, precisions)
    found = correlations_of(pooled_pairs(by_precision))
    quantized = [p for p in precisions if not is_full_precision(p)]
    if len(quantized) > 1:
        for precision in quantized:
            found += correlations_of(by_precision.get(precision, {}), precision)
    return found


def correlations_of(pairs: Pairs, precision: str | None = None) -> list[Correlation]:
    out = []
    for key in (*DIAGNOSTICS.values(), FIRST_ORDER):
        for target in REVERSION_TARGETS:
            found = pairs.get((key, target), [])
            rho = rank_correlation([x for x, _ in found], [y for _, y in found])
            out.append(Correlation(diagnostic=key, target=target, rho=rho, pairs=len(found),
                                   predicts=rho.excludes(0.0) is not None, precision=precision))
    return out


def _count_sentence(f: StrategyFinding) -> str:
    without = f.groups - f.measurable - f.without_items
    older = f"; {f.without_items} without per-item scores, from an older run" if f.without_items else ""
    floored = f", {f.at_retrain} at the retrain model's level" if f.at_retrain else ""
    return (f"{f.strategy}: {f.reverted} of {f.measurable} rows with a measurable effect reverted, {f.holds} held"
            f"{floored}, {f.inconclusive} inconclusive ({without} without a measurable effect{older}); median "
            f"KnowMem-forget reversion {_fmt(f.median_reversion_knowmem_f)}, utility {_fmt(f.mean_utility_anchor)} -> "
            f"{_fmt(f.mean_utility_q)}")


def _pooled_sentence(pooled: PooledReversion, threshold: float) -> str:
    """A strategy's pooled KnowMem-forget reversion with the same verdict rule as a row's (the pooled estimate
    exists only where the summed forgetting is measurable), over the methods not at the retrain model's level."""
    kept = [m for m in pooled.methods if m not in pooled.at_retrain]
    side = pooled.knowmem_f.excludes(threshold) if pooled.knowmem_f is not None else None
    said = ("none (every method at the retrain model's level)" if not kept else
            "none (the summed forgetting is not measurable, or the evaluations hold no per-item scores)"
            if pooled.knowmem_f is None else
            f"{_fmt_estimate(pooled.knowmem_f)}, "
            + {"above": "reverted", "below": "holds", None: "inconclusive"}[side])
    left_out = (f"; {', '.join(pooled.at_retrain)} at the retrain model's level, left out" if pooled.at_retrain and kept
                else "")
    return (f"{pooled.strategy} pooled over {len(pooled.methods)} methods ({pooled.runs} runs): KnowMem-forget "
            f"reversion {said}{left_out}")


def finding_sentence(findings: list[StrategyFinding], low: str | None, threshold: float,
                     pooled: Sequence[PooledReversion] = ()) -> str:
    at_low = [f for f in findings if f.precision == low]
    if low is None or not at_low:
        return "No quantized precision with an unlearning row in the grid."
    sentence = (f"At {low} (a row reverts when its KnowMem-forget reversion's 95% interval lies above {threshold}, "
                f"holds when it lies below): " + "; ".join(_count_sentence(f) for f in at_low) + ".")
    pooled_at_low = [p for p in pooled if p.precision == low]
    if pooled_at_low:
        sentence += " " + "; ".join(_pooled_sentence(p, threshold) for p in pooled_at_low) + "."
    return sentence


def first_order_predicts(found: list[Correlation]) -> bool:
    """The first-order prediction is a reversion in its own right; it is printed only once its rank correlation
    with the measured reversion is positive beyond its interval."""
    return any(c.diagnostic == FIRST_ORDER and c.predicts and (c.rho.value or 0.0) > 0 and c.precision is None
               for c in found)


def _pairs_phrase(c: Correlation) -> str:
    wrong = " (the wrong sign for a predicted reversion)" if c.diagnostic == FIRST_ORDER and (c.rho.value or 0) < 0 \
        else ""
    return f"{c.diagnostic} vs {c.target} rho {_fmt_estimate(c.rho)} over {c.pairs} pairs{wrong}"


def by_chance(tested: int) -> str:
    """How many of `tested` independent null correlations would exclude 0 at the intervals' level."""
    return f"about {tested * (1 - LEVEL):.1f} would by chance at {LEVEL:.0%}"


def prediction_sentence(found: list[Correlation]) -> str:
    usable = [c for c in found if c.rho.value is not None and c.precision is None]
    if not usable:
        return "Too few quantized cells with a measurable effect to test whether the diagnostics predict reversion."
    predicting = [c for c in usable if c.predicts]
    if not predicting:
        best = max(usable, key=lambda c: abs(c.rho.value or 0.0))
        return (f"No diagnostic predicts the measured reversion here: every rank correlation's 95% interval "
                f"includes 0 (the strongest, {best.diagnostic} vs {best.target}: rho {_fmt_estimate(best.rho)} over "
                f"{best.pairs} pairs).")
    sentence = ("Over every quantizer's pairs, diagnostics whose rank correlation with the measured reversion "
                "excludes 0: " + "; ".join(_pairs_phrase(c) for c in predicting) + ".")
    within = [c for c in found if c.precision is not None]
    if not within:
        return sentence
    holding = [c for c in within if c.predicts]
    if not holding:
        return sentence + (" Within one quantizer none does (every interval includes 0): over all pairs they rank "
                           "the quantizers, not the cells deployed with one of them.")
    tested = [c for c in within if c.rho.value is not None]
    return sentence + f" Within one quantizer, {len(holding)} of {len(tested)} correlations exclude 0 " \
        f"({by_chance(len(tested))}): " + "; ".join(
            f"at {c.precision}, {_pairs_phrase(c)}" for c in holding) + "."


def transfer_lines(rows: list[Row], strategies: Sequence[Strategy]) -> list[str]:
    """Quantization-aware strategies, trained against one quantizer: does the forgetting hold at the others?"""
    lines = []
    for strategy in (s.label for s in strategies if s.qat is not None):
        others = [r for r in rows if r.strategy == strategy and r.anchor is not None and r.deployed
                  and r.precision != r.anchor]
        if not others:
            continue
        parts = [f"{r.method} at {r.precision} {_fmt_estimate(_effect_part(r, 'knowmem_f', 'reversion'))} "
                 f"({r.verdict})" for r in others]
        lines.append(f"- {strategy} (anchored at {others[0].anchor}, where it is deployed): KnowMem-forget "
                     "reversion " + "; ".join(parts))
    return lines


def plot_tradeoff(rows: list[Row], low: str | None, path: Path) -> None:
    """Utility vs KnowMem-forget per (method, strategy), mean over seeds: an arrow from where its forgetting is
    anchored (fp, or a QAT row's own quantizer) to the lowest-bit precision."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    anchors = [r for r in rows if r.group and r.verdict == "anchor"]
    strategies = list(dict.fromkeys(r.strategy for r in anchors))
    for i, row in enumerate(anchors):
        color = colors[i % len(colors)]
        marker = markers[strategies.index(row.strategy) % len(markers)]
        start = row.metrics
        ax.scatter(start.knowmem_f, start.knowmem_r, color=color, marker=marker, label=f"{row.group} @ {row.anchor}")
        end = next((r for r in rows if r.group == row.group and r.precision == low), None)
        if end is not None and end is not row:
            ax.annotate("", xy=(end.metrics.knowmem_f, end.metrics.knowmem_r),
                        xytext=(start.knowmem_f, start.knowmem_r), arrowprops={"arrowstyle": "->", "color": color})
    for name, marker in (("target", "*"), ("retrain", "P")):
        found = next((r for r in rows if r.method == name and r.precision == FULL_PRECISION.label), None)
        if found is not None:
            ax.scatter(found.metrics.knowmem_f, found.metrics.knowmem_r, color="black", marker=marker, s=120,
                       label=f"{name} (fp)")
    ax.set_xlabel("KnowMem on forget (lower = more forgotten)")
    ax.set_ylabel("Utility = KnowMem on retain")
    ax.set_title("Unlearning rows: anchor -> " + (low or "(no quantized precision)"))
    ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=120)


def plot_reversion(rows: list[Row], threshold: float, path: Path) -> None:
    """KnowMem-forget reversion with its 95% interval for every quantized deployed row, threshold and 0 marked."""
    plt = pyplot()
    shown = [r for r in rows if r.verdict in MEASURABLE and _effect_part(r, "knowmem_f", "reversion") is not None]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(shown) + 1.2)))
    colors = {"reverted": "tab:red", "holds": "tab:green", "at retrain": "tab:blue", "inconclusive": "tab:grey"}
    for y, row in enumerate(shown):
        estimate = _effect_part(row, "knowmem_f", "reversion")
        assert estimate is not None and estimate.value is not None
        low = estimate.low if estimate.low is not None else estimate.value
        high = estimate.high if estimate.high is not None else estimate.value
        ax.errorbar(estimate.value, y, xerr=[[estimate.value - low], [high - estimate.value]], fmt="o",
                    color=colors[row.verdict or "inconclusive"], capsize=3)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.axvline(threshold, color="tab:red", lw=0.8, ls="--")
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([f"{r.group} @ {r.precision}" for r in shown], fontsize=7)
    ax.set_xlabel("KnowMem-forget reversion (precision-matched; 0 = all forgetting kept, 1 = all given back)")
    ax.set_title("Reversion with 95% intervals (red: reverted, green: holds, blue: at the retrain model's level, "
                 "grey: inconclusive)", fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def build_report(out: Path, config: ExperimentConfig, references: ReferenceCellResult,
                 cells: list[UnlearnCellResult]) -> ExperimentResults:
    precisions = [p.label for p in config.precisions]
    low = low_precision(config.precisions)
    measure = Measurement(references=references, resamples=config.eval.bootstrap, seed=config.seed,
                          threshold=config.reversion_threshold)
    started = time.perf_counter()
    rows = collect_rows(measure, cells, precisions)
    found = correlations(measure, cells, precisions)
    differences = strategy_differences(measure, cells, precisions)
    pooled, pooled_differences = pooled_reversions(measure, cells, precisions, rows)
    bootstrap_seconds = time.perf_counter() - started
    findings = strategy_findings(rows, [s.label for s in config.strategies], precisions)
    results = ExperimentResults(config=config, versions=package_versions(), git_commit=git_commit(),
                                references=references, cells=cells, rows=rows, low_precision=low,
                                reversion_threshold=config.reversion_threshold, strategies=findings,
                                correlations=found,
                                finding=finding_sentence(findings, low, config.reversion_threshold, pooled),
                                differences=differences + pooled_differences, pooled=pooled,
                                bootstrap_seconds=bootstrap_seconds)
    atomic_write_json(out / "results.json", results)
    table = table_markdown(rows, predicted=first_order_predicts(found))
    atomic_write_text(out / "table.md", table)
    atomic_write_text(out / "table.csv", table_csv(rows))
    plot_tradeoff(rows, low, out / "plots" / "tradeoff.png")
    plot_reversion(rows, config.reversion_threshold, out / "plots" / "reversion.png")
    atomic_write_text(out / "report.md", report_markdown(results, table))
    return results


def _strategy_table(findings: list[StrategyFinding]) -> list[str]:
    lines = ["| strategy | precision | rows | measurable | reverted | holds | at retrain | inconclusive | median "
             "reversion KnowMem-f | median reversion answer NLL | utility at anchor | utility quantized |",
             "|" + "---|" * 12]
    for f in findings:
        lines.append(f"| {f.strategy} | {f.precision} | {f.groups} | {f.measurable} | {f.reverted} | {f.holds} | "
                     f"{f.at_retrain} | {f.inconclusive} | {_fmt(f.median_reversion_knowmem_f)} | "
                     f"{_fmt(f.median_reversion_answer_nll)} | {_fmt(f.mean_utility_anchor)} | "
                     f"{_fmt(f.mean_utility_q)} |")
    return lines


def _difference_table(differences: list[StrategyDifference]) -> list[str]:
    if not differences:
        return []
    lines = ["Reversion against full fine-tuning's (the strategy's minus full's, same method and quantizer; < 0: "
             "the strategy gives back less), 95% interval paired over items, each side's seeds resampled on their "
             "own:", "", "| method | strategy | precision | KnowMem-f | answer NLL | forget NLL |",
             "|---|---|---|---|---|---|"]
    for d in differences:
        method = f"pooled: {', '.join(d.methods)}" if d.methods else d.method
        if d.at_retrain:
            method += f" (KnowMem-f without {', '.join(d.at_retrain)}: at retrain)"
        lines.append(f"| {method} | {d.strategy} | {d.precision} | {_fmt_estimate(d.knowmem_f)} | "
                     f"{_fmt_estimate(d.knowmem_f_answer_nll)} | {_fmt_estimate(d.nll_privleak_forget)} |")
    return lines + [""]


def _pooled_table(pooled: list[PooledReversion]) -> list[str]:
    if not pooled:
        return []
    lines = ["Reversion pooled over the methods (1 - the methods' summed forgetting at the quantizer / summed at the "
             "anchor), 95% interval over items (one resample for every method) and each method's seeds; KnowMem-f "
             "leaves out the methods at the retrain model's level (a floored metric would add the target's own loss "
             "as reversion):", "",
             "| strategy | precision | methods | runs | at retrain (not in KnowMem-f) | KnowMem-f | answer NLL | "
             "forget NLL |", "|---|---|---|---|---|---|---|---|"]
    for p in pooled:
        lines.append(f"| {p.strategy} | {p.precision} | {', '.join(p.methods)} | {p.runs} | "
                     f"{', '.join(p.at_retrain) or '-'} | "
                     f"{_fmt_estimate(p.knowmem_f)} | {_fmt_estimate(p.knowmem_f_answer_nll)} | "
                     f"{_fmt_estimate(p.nll_privleak_forget)} |")
    return lines + [""]


def _correlation_table(found: list[Correlation]) -> list[str]:
    lines = ["| quantizer | diagnostic | reversion of | Spearman rho [95% CI] | pairs | predicts |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {c.precision or 'all'} | {c.diagnostic} | {c.target} | {_fmt_estimate(c.rho)} | {c.pairs} | "
              f"{'yes' if c.predicts else 'no'} |" for c in found]
    return lines


DEFINITION = (
    "**Reversion** is measured precision-matched: at each precision P the forgetting is effect_P = the target's "
    "metric minus the unlearned model's (signed so that forgetting is positive: KnowMem and VerbMem down, the "
    "answers' NLL, the forget NLL and the Min-40% AUC up), both models quantized the same way; retained = "
    "effect_Q / effect_anchor, reversion = 1 - retained (0: the quantizer kept all the forgetting, 1: it gave all "
    "of it back). The anchor is full precision, or for a quantization-aware strategy its own quantizer (its fp model "
    "is never deployed and carries no share). Intervals are 95% percentile bootstraps over items, paired (the same "
    "resampled questions and texts for every model compared; the AUC's splits resampled separately) and, with "
    "several seeds, over seeds as well (each resample draws seeds with replacement, then items; the seeds' effects "
    "are averaged). A row *reverts* when its KnowMem-forget reversion interval lies above the threshold, *holds* "
    "when it lies below, and is *inconclusive* otherwise; it is *at retrain* when its KnowMem-forget at Q is "
    "measurably no higher than the retrain model's at Q (the whole `KnowMem-f - retrain` interval <= 0: whatever "
    "the quantizer did to the target, no forgotten answer came back beyond the retrain's; a bounded metric at its "
    "floor turns the target's own quantization loss into a spurious precision-matched reversion there); a row whose "
    "anchor forgetting interval includes 0 has "
    "*no effect* to give back and is not counted. `KnowMem-f - retrain`: the unlearned model's KnowMem-forget minus "
    "the retrain model's at the same precision (MUSE's view: 0 = as if never trained on the forget set).")


def report_markdown(results: ExperimentResults, table: str) -> str:
    config, low = results.config, results.low_precision
    reference = results.references.retrain_reference
    seeds = config.unlearn_seeds
    lines = [f"# qrunlearn report: {config.name}", "", "## Finding at this scale", "", results.finding, "",
             DEFINITION, "", "## Strategies at each quantized precision", "", *_strategy_table(results.strategies),
             "", *_pooled_table(results.pooled), *_difference_table(results.differences)]
    transfer = transfer_lines(results.rows, config.strategies)
    if transfer:
        lines += ["Transfer (a model made robust for one quantizer, deployed with the others):", "", *transfer, ""]
    lines += ["## Do the diagnostics predict reversion?", "", prediction_sentence(results.correlations), "",
              *_correlation_table(results.correlations), "",
              "*relative error* = ||dQ - dW|| / ||dW||, how far the quantized update is from the update (0: kept "
              "exactly, 1: as far as no update at all); *codes changed*: share of quantization codes that differ "
              "between Q(target) and Q(unlearned); *|dW| / step*: mean weight change in quantization steps; "
              f"*{FIRST_ORDER}* = 1 - g.dQ / g.dW with g the gradient of the forget answers' NLL at the unlearned "
              "model (dQ = Q(unlearned) - Q(target); parameters the quantizer leaves alone carry dW into both): a "
              "first-order prediction of the answer-NLL reversion, shown in the table only if it predicts. Each "
              "pair is one unlearning cell (one seed) at one quantized precision with a measurable anchor effect.",
              "", "## Table", "",
              "VerbMem, KnowMem and Utility are ROUGE-L F1 x 100 (means over seeds); PrivLeak is relative to the "
              f"retrain AUC {_fmt(reference.auc, 4)} ({reference.source}); answer NLL = mean NLL of the KnowMem "
              "forget answers; forget NLL = mean per-token NLL on privleak/forget; Min-40% AUC = forget vs holdout. "
              "Forgetting, reversion and gap columns: value [95% interval]; `table.csv` and `results.json` hold the "
              "same for VerbMem and the Min-40% AUC.", "", table,
              "## Plots", "", f"- `plots/tradeoff.png`: utility vs KnowMem-forget per row, arrow to {low or '-'}.",
              "- `plots/reversion.png`: KnowMem-forget reversion with its interval per quantized row."]
    for cell in results.cells:
        for precision, survival in cell.survival.items():
            lines.append(f"- `{survival.plot}`: per-layer survival, {cell.cell} at {precision}. {survival.verdict}")
    lines += ["", "## Run it at the paper's scale", "",
              "On GPUs, the same grid on Llama-2-7B with MUSE-News (bf16, bitsandbytes NF4 / LLM.int8 on CUDA):", "",
              f"    {GPU_COMMAND}", "", "## Settings", "",
              f"- seed {config.seed}; unlearning seeds {', '.join(map(str, seeds))}; defaults `{config.defaults}`; "
              f"methods {', '.join(config.methods)}; strategies "
              f"{', '.join(map(str, config.strategies))}; precisions {', '.join(map(str, config.precisions))}; "
              f"reversion threshold {results.reversion_threshold}",
              f"- eval: limit {config.eval.limit}, batch size {config.eval.batch_size}, "
              f"bootstrap {config.eval.bootstrap} (the report's paired bootstrap: {results.bootstrap_seconds:.1f} s)",
              f"- git commit {results.git_commit}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in results.versions.items() if v),
              "- per-cell settings, losses and timings: `cells/<cell>/result.json`; every number: `results.json`", ""]
    for cell in results.cells:
        u = cell.unlearn
        lines.append(f"- {cell.cell}: {u.epochs_run} epochs, {u.seconds:.1f} s of training"
                     + (f", stopped: {u.stopped_reason}" if u.stopped_reason else "")
                     + (f", selected epoch {u.selected_epoch}" if u.selected_epoch else ""))
    return "\n".join(lines) + "\n"
