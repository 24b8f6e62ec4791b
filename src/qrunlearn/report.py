"""Turn an experiment's finished cells into results.json, table.md / table.csv, plots and report.md.

Takes typed cell results (`qrunlearn.results`), never the experiment object: `experiment -> report` is the only
direction of dependency. Every sentence of the report is computed from the numbers it reports.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qrunlearn.config import ExperimentConfig
from qrunlearn.io import atomic_write_json, atomic_write_text, git_commit, package_versions
from qrunlearn.plotting import pyplot, save_figure
from qrunlearn.quant import is_full_precision, parse_spec
from qrunlearn.results import (
    Correlation,
    ExperimentResults,
    Metrics,
    ReferenceCellResult,
    Reversion,
    Row,
    StrategyFinding,
    UnlearnCellResult,
)
from qrunlearn.unlearn.strategy import parse_strategy

# table column -> metric field
COLUMNS = {"VerbMem": "verbmem_f", "KnowMem-forget": "knowmem_f", "PrivLeak": "privleak", "Utility": "knowmem_r"}
EXTRA_COLUMNS = {"answer NLL": "knowmem_f_answer_nll", "forget NLL": "nll_privleak_forget",
                 "Min-40% AUC": "privleak_auc"}
REVERSION_COLUMNS = {"reversion KnowMem-f": "knowmem_f", "reversion answer NLL": "answer_nll"}
SURVIVAL_COLUMNS = {"codes changed": "codes_changed_frac", "projection": "projection", "cosine": "cosine",
                    "|dW| / step": "mean_abs_dw_in_steps"}
GPU_COMMAND = "accelerate launch -m qrunlearn run configs/muse-news-llama2-7b.yaml --out runs/muse-news"
# A reversion is computed only where unlearning moved the metric by at least this much (else the share is noise).
MIN_EFFECT = {"knowmem_f": 1.0, "answer_nll": 0.05}
# A cell whose quantized model gets back this share of the forgotten KnowMem counts as reverted.
REVERT_SHARE = 0.25
# A diagnostic "predicts" reversion when its rank correlation reaches this over at least PREDICT_PAIRS pairs.
PREDICT_RHO = 0.6
PREDICT_PAIRS = 8


def _fmt(value: float | str | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def low_precision(precisions: Sequence[str]) -> str | None:
    """The lowest-bit quantized precision of the grid (the one the paper's claim is about)."""
    quantized = [p for p in precisions if not is_full_precision(p)]
    if not quantized:
        return None
    return min(quantized, key=lambda p: parse_spec(p).bits or 0)


def _share(target: float | None, fp: float | None, q: float | None, minimum: float,
           forgetting_sign: int) -> float | None:
    """(q - fp) / (target - fp), or None unless unlearning moved the metric by at least `minimum` in the forgetting
    direction (`forgetting_sign` -1: down, as KnowMem-forget; +1: up, as the answers' NLL): a share of an effect
    that went the wrong way would read as reversion where there was no forgetting to undo."""
    if target is None or fp is None or q is None or forgetting_sign * (fp - target) < minimum:
        return None
    return (q - fp) / (target - fp)


def reversion(target: Metrics, fp: Metrics, q: Metrics) -> Reversion:
    return Reversion(knowmem_f=_share(target.knowmem_f, fp.knowmem_f, q.knowmem_f, MIN_EFFECT["knowmem_f"], -1),
                     answer_nll=_share(target.knowmem_f_answer_nll, fp.knowmem_f_answer_nll, q.knowmem_f_answer_nll,
                                       MIN_EFFECT["answer_nll"], +1))


def collect_rows(references: ReferenceCellResult, cells: list[UnlearnCellResult], precisions: list[str]) -> list[Row]:
    rows = []
    for name, evals in (("target", references.target_evals), ("retrain", references.retrain_evals)):
        for precision in precisions:
            if precision in evals:
                rows.append(Row(method=name, strategy="", precision=precision, metrics=evals[precision].metrics))
    target = references.target_evals["fp"].metrics if "fp" in references.target_evals else None
    for cell in cells:
        fp = cell.evals["fp"].metrics if "fp" in cell.evals else None
        for precision in precisions:
            survival = cell.survival.get(precision)
            metrics = cell.evals[precision].metrics
            shares = None
            if not is_full_precision(precision) and target is not None and fp is not None:
                shares = reversion(target, fp, metrics)
            rows.append(Row(cell=cell.cell, method=cell.method, strategy=cell.strategy, precision=precision,
                            metrics=metrics, reversion=shares,
                            survival=survival.overall if survival is not None else None))
    return rows


def _row_values(row: Row) -> dict[str, float | None]:
    values: dict[str, float | None] = {c: getattr(row.metrics, k) for c, k in {**COLUMNS, **EXTRA_COLUMNS}.items()}
    for column, key in REVERSION_COLUMNS.items():
        values[column] = getattr(row.reversion, key) if row.reversion is not None else None
    for column, key in SURVIVAL_COLUMNS.items():
        values[column] = getattr(row.survival, key) if row.survival is not None else None
    return values


HEADERS = ["Method", "Strategy", "Precision", *COLUMNS, *EXTRA_COLUMNS, *REVERSION_COLUMNS, *SURVIVAL_COLUMNS]


def table_markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in rows:
        values = _row_values(row)
        cells = [row.method, row.strategy or "-", row.precision, *(_fmt(values[c]) for c in COLUMNS),
                 *(_fmt(values[c], 3) for c in EXTRA_COLUMNS), *(_fmt(values[c]) for c in REVERSION_COLUMNS),
                 *(_fmt(values[c], 3) for c in SURVIVAL_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows: list[Row]) -> str:
    buffer = io.StringIO()
    fields = ["method", "strategy", "precision", *HEADERS[3:]]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({"method": row.method, "strategy": row.strategy, "precision": row.precision,
                         **_row_values(row)})
    return buffer.getvalue()


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def strategy_findings(rows: list[Row], strategies: Sequence[str], precisions: Sequence[str]) -> list[StrategyFinding]:
    """Per strategy and quantized precision: how often and how much the quantizer undoes the unlearning, and the
    utility it keeps (mean over the methods)."""
    fp_utility = {row.cell: row.metrics.knowmem_r for row in rows if row.cell and is_full_precision(row.precision)}
    findings = []
    for strategy in strategies:
        for precision in precisions:
            group = [r for r in rows if r.strategy == strategy and r.precision == precision and r.reversion]
            if not group:
                continue
            shares = [r.reversion.knowmem_f for r in group if r.reversion]
            findings.append(StrategyFinding(
                strategy=strategy, precision=precision, cells=len(group),
                reverted=sum(1 for s in shares if s is not None and s >= REVERT_SHARE),
                median_reversion_knowmem_f=_median(shares),
                median_reversion_answer_nll=_median([r.reversion.answer_nll for r in group if r.reversion]),
                mean_utility_fp=_mean([fp_utility.get(r.cell) for r in group]),
                mean_utility_q=_mean([r.metrics.knowmem_r for r in group])))
    return findings


def _ranks(values: Sequence[float]) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for value in set(values):  # ties share their mean rank
        tied = np.asarray(values) == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    if len(xs) < 3:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def correlations(rows: list[Row]) -> list[Correlation]:
    """Does the survival diagnostic (computed from weights alone, before deployment) predict the reversion measured
    by evaluating the quantized model? One rank correlation per (diagnostic, reversion metric)."""
    out = []
    for diagnostic in SURVIVAL_COLUMNS.values():
        for target in REVERSION_COLUMNS.values():
            pairs = [(getattr(r.survival, diagnostic), getattr(r.reversion, target)) for r in rows
                     if r.survival is not None and r.reversion is not None]
            pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
            out.append(Correlation(diagnostic=diagnostic, target=target, pairs=len(pairs),
                                   rho=spearman([x for x, _ in pairs], [y for _, y in pairs])))
    return out


def finding_sentence(findings: list[StrategyFinding], low: str | None) -> str:
    at_low = [f for f in findings if f.precision == low]
    if low is None or not at_low:
        return "No quantized precision with a measurable unlearning effect in the grid."
    parts = []
    for f in at_low:
        knowmem = _fmt(f.median_reversion_knowmem_f)
        nll = _fmt(f.median_reversion_answer_nll)
        parts.append(f"{f.strategy} reverted in {f.reverted} of {f.cells} cells (median share of the unlearning "
                     f"undone: KnowMem-forget {knowmem}, answer NLL {nll}; utility {_fmt(f.mean_utility_fp)} -> "
                     f"{_fmt(f.mean_utility_q)})")
    return f"At {low}: " + "; ".join(parts) + "."


def prediction_sentence(found: list[Correlation]) -> str:
    usable = [c for c in found if c.rho is not None]
    if not usable:
        return "Too few quantized cells with a measurable effect to test whether the diagnostics predict reversion."
    best = max(usable, key=lambda c: abs(c.rho or 0))
    verdict = ("predicts" if abs(best.rho or 0) >= PREDICT_RHO and best.pairs >= PREDICT_PAIRS
               else "does not predict")
    return (f"The closest diagnostic, {best.diagnostic}, {verdict} the measured {best.target} reversion: Spearman "
            f"rho {best.rho:.2f} over {best.pairs} (cell, precision) pairs (threshold |rho| >= {PREDICT_RHO} over "
            f">= {PREDICT_PAIRS} pairs).")


def transfer_lines(findings: list[StrategyFinding]) -> list[str]:
    """Quantization-aware strategies, trained against one quantizer: do they hold at the others?"""
    lines = []
    for strategy in dict.fromkeys(f.strategy for f in findings):
        trained_for = parse_strategy(strategy).qat
        if trained_for is None:
            continue
        own = [f for f in findings if f.strategy == strategy and f.precision == trained_for]
        others = [f for f in findings if f.strategy == strategy and f.precision != trained_for]
        if own and others:
            lines.append(f"- {strategy}: median KnowMem-forget reversion {_fmt(own[0].median_reversion_knowmem_f)} "
                         f"at its own {trained_for}; at the others: " + ", ".join(
                             f"{f.precision} {_fmt(f.median_reversion_knowmem_f)}" for f in others))
    return lines


def plot_tradeoff(references: ReferenceCellResult, cells: list[UnlearnCellResult], low: str | None,
                  path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    strategies = list(dict.fromkeys(cell.strategy for cell in cells))
    for i, cell in enumerate(cells):
        fp = cell.evals["fp"].metrics
        color = colors[i % len(colors)]
        marker = markers[strategies.index(cell.strategy) % len(markers)]
        ax.scatter(fp.knowmem_f, fp.knowmem_r, color=color, marker=marker, label=cell.cell)
        if low is not None:
            q = cell.evals[low].metrics
            ax.annotate("", xy=(q.knowmem_f, q.knowmem_r), xytext=(fp.knowmem_f, fp.knowmem_r),
                        arrowprops={"arrowstyle": "->", "color": color})
    for name, evals, marker in (("target", references.target_evals, "*"),
                                ("retrain", references.retrain_evals, "P")):
        if "fp" in evals:
            metrics = evals["fp"].metrics
            ax.scatter(metrics.knowmem_f, metrics.knowmem_r, color="black", marker=marker, s=120,
                       label=f"{name} (fp)")
    ax.set_xlabel("KnowMem on forget (lower = more forgotten)")
    ax.set_ylabel("Utility = KnowMem on retain")
    ax.set_title("Unlearning cells: full precision -> " + (low or "(no quantized precision)"))
    ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=120)


def build_report(out: Path, config: ExperimentConfig, references: ReferenceCellResult,
                 cells: list[UnlearnCellResult]) -> ExperimentResults:
    precisions = list(config.precisions)
    low = low_precision(precisions)
    rows = collect_rows(references, cells, precisions)
    findings = strategy_findings(rows, config.strategies, precisions)
    results = ExperimentResults(config=config, versions=package_versions(), git_commit=git_commit(),
                                references=references, cells=cells, rows=rows, low_precision=low,
                                strategies=findings, correlations=correlations(rows),
                                finding=finding_sentence(findings, low))
    atomic_write_json(out / "results.json", results)
    table = table_markdown(rows)
    atomic_write_text(out / "table.md", table)
    atomic_write_text(out / "table.csv", table_csv(rows))
    plot_tradeoff(references, cells, low, out / "plots" / "tradeoff.png")
    atomic_write_text(out / "report.md", report_markdown(results, table))
    return results


def _strategy_table(findings: list[StrategyFinding]) -> list[str]:
    lines = ["| strategy | precision | cells | reverted | median reversion KnowMem-f | median reversion answer NLL | "
             "utility fp | utility quantized |", "|" + "---|" * 8]
    for f in findings:
        lines.append(f"| {f.strategy} | {f.precision} | {f.cells} | {f.reverted} | "
                     f"{_fmt(f.median_reversion_knowmem_f)} | {_fmt(f.median_reversion_answer_nll)} | "
                     f"{_fmt(f.mean_utility_fp)} | {_fmt(f.mean_utility_q)} |")
    return lines


def _correlation_table(found: list[Correlation]) -> list[str]:
    lines = ["| diagnostic | reversion of | Spearman rho | pairs |", "|---|---|---|---|"]
    lines += [f"| {c.diagnostic} | {c.target} | {_fmt(c.rho)} | {c.pairs} |" for c in found]
    return lines


def report_markdown(results: ExperimentResults, table: str) -> str:
    config, low = results.config, results.low_precision
    reference = results.references.retrain_reference
    lines = [f"# qrunlearn report: {config.name}", "", "## Finding at this scale", "", results.finding, "",
             "Reversion = (m_Q - m_fp) / (m_target - m_fp): the share of the unlearning effect (target -> unlearned "
             "at full precision) that quantization undoes, for KnowMem-forget and for the mean NLL of the forget "
             "answers given their questions; 1 = back at the target, 0 = unchanged, < 0 = quantization forgot more. "
             f"A cell counts as reverted at a KnowMem share >= {REVERT_SHARE}; shares are left out where unlearning "
             f"moved the metric less than {MIN_EFFECT['knowmem_f']} point / {MIN_EFFECT['answer_nll']} nats in the "
             "forgetting direction (KnowMem-forget down, answer NLL up).", "",
             "## Strategies at each quantized precision", "", *_strategy_table(results.strategies), ""]
    transfer = transfer_lines(results.strategies)
    if transfer:
        lines += ["Transfer (a model made robust for one quantizer, deployed with the others):", "", *transfer, ""]
    lines += ["## Do the survival diagnostics predict reversion?", "", prediction_sentence(results.correlations), "",
              *_correlation_table(results.correlations), "",
              "*codes changed*: share of quantization codes that differ between Q(target) and Q(unlearned); "
              "*projection* = sum(dQ*dW)/sum(dW^2), how much of the update's direction survives on average; "
              "*cosine*: how faithfully; *abs(dW)/step*: mean weight change in quantization steps.", "",
              "## Table", "",
              "VerbMem, KnowMem and Utility are ROUGE-L F1 x 100; PrivLeak is relative to the retrain AUC "
              f"{_fmt(reference.auc, 4)} ({reference.source}); answer NLL = mean NLL of the KnowMem forget answers; "
              "forget NLL = mean per-token NLL on privleak/forget; Min-40% AUC = forget vs holdout. Survival and "
              "reversion columns are for quantized rows.", "", table,
              "## Plots", "", f"- `plots/tradeoff.png`: utility vs KnowMem-forget per cell, arrow to {low or '-'}."]
    for cell in results.cells:
        for precision, survival in cell.survival.items():
            lines.append(f"- `{survival.plot}`: per-layer survival, {cell.cell} at {precision}. {survival.verdict}")
    lines += ["", "## Run it at the paper's scale", "",
              "On GPUs, the same grid on Llama-2-7B with MUSE-News (bf16, bitsandbytes NF4 / LLM.int8 on CUDA):", "",
              f"    {GPU_COMMAND}", "", "## Settings", "",
              f"- seed {config.seed}; defaults `{config.defaults}`; methods {', '.join(config.methods)}; strategies "
              f"{', '.join(config.strategies)}; precisions {', '.join(config.precisions)}",
              f"- eval: limit {config.eval.limit}, batch size {config.eval.batch_size}, "
              f"bootstrap {config.eval.bootstrap}",
              f"- git commit {results.git_commit}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in results.versions.items() if v),
              "- per-cell settings, losses and timings: `cells/<cell>/result.json`; every number: `results.json`", ""]
    for cell in results.cells:
        u = cell.unlearn
        lines.append(f"- {cell.cell}: {u.epochs_run} epochs, {u.seconds:.1f} s"
                     + (f", stopped: {u.stopped_reason}" if u.stopped_reason else "")
                     + (f", selected epoch {u.selected_epoch}" if u.selected_epoch else ""))
    return "\n".join(lines) + "\n"
