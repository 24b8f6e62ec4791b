"""Turn an experiment's finished cells into results.json, table.md / table.csv, plots and report.md.

Takes typed cell results (`qrunlearn.results`), never the experiment object: `experiment -> report` is the only
direction of dependency.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from qrunlearn.config import ExperimentConfig
from qrunlearn.io import (
    atomic_write_json,
    atomic_write_text,
    git_commit,
    package_versions,
)
from qrunlearn.plotting import pyplot, save_figure
from qrunlearn.quant import is_full_precision, parse_spec
from qrunlearn.results import (
    ExperimentResults,
    Finding,
    ReferenceCellResult,
    Row,
    UnlearnCellResult,
)

# table column -> metric field
COLUMNS = {"VerbMem": "verbmem_f", "KnowMem-forget": "knowmem_f", "PrivLeak": "privleak", "Utility": "knowmem_r"}
SURVIVAL_COLUMNS = {"codes changed": "codes_changed_frac", "projection": "projection", "cosine": "cosine",
                    "|dW| / step": "mean_abs_dw_in_steps"}
GPU_COMMAND = "accelerate launch -m qrunlearn run configs/muse-news-llama2-7b.yaml --out runs/muse-news"
# A share of the forgotten KnowMem that comes back at low precision above this is called a reversion.
REVERT_SHARE = 0.25
REVERT_POINTS = 5.0


def _fmt(value: float | str | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def low_precision(precisions: list[str] | tuple[str, ...]) -> str | None:
    """The lowest-bit quantized precision of the grid (the one the paper's claim is about)."""
    quantized = [p for p in precisions if not is_full_precision(p)]
    if not quantized:
        return None
    return min(quantized, key=lambda p: parse_spec(p).bits or 0)


def collect_rows(references: ReferenceCellResult, cells: list[UnlearnCellResult], precisions: list[str]) -> list[Row]:
    rows = []
    for name, evals in (("target", references.target_evals), ("retrain", references.retrain_evals)):
        for precision in precisions:
            if precision in evals:
                rows.append(Row(method=name, adapter="", precision=precision, metrics=evals[precision].metrics))
    for cell in cells:
        for precision in precisions:
            survival = cell.survival.get(precision)
            rows.append(Row(method=cell.method, adapter=cell.adapter, precision=precision,
                            metrics=cell.evals[precision].metrics,
                            survival=survival.overall if survival is not None else None))
    return rows


def _row_values(row: Row) -> dict[str, float | None]:
    values: dict[str, float | None] = {column: getattr(row.metrics, key) for column, key in COLUMNS.items()}
    values["forget NLL"] = row.metrics.nll_privleak_forget
    for column, key in SURVIVAL_COLUMNS.items():
        values[column] = getattr(row.survival, key) if row.survival is not None else None
    return values


def table_markdown(rows: list[Row]) -> str:
    headers = ["Method", "Adapter", "Precision", *COLUMNS, "forget NLL", *SURVIVAL_COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        values = _row_values(row)
        cells = [row.method, row.adapter or "-", row.precision, *(_fmt(values[c]) for c in COLUMNS),
                 _fmt(values["forget NLL"], 3), *(_fmt(values[c], 3) for c in SURVIVAL_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows: list[Row]) -> str:
    buffer = io.StringIO()
    fields = ["method", "adapter", "precision", *COLUMNS, "forget NLL", *SURVIVAL_COLUMNS]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({"method": row.method, "adapter": row.adapter, "precision": row.precision,
                         **_row_values(row)})
    return buffer.getvalue()


def reversion_findings(references: ReferenceCellResult, cells: list[UnlearnCellResult], low: str) -> list[Finding]:
    """Per cell: how much of the KnowMem-forget that unlearning removed comes back at the low precision (cells
    without KnowMem-forget, i.e. a grid that does not measure it, give no finding)."""
    target_kf = references.target_evals["fp"].metrics.knowmem_f if "fp" in references.target_evals else None
    findings = []
    for cell in cells:
        if "fp" not in cell.evals:
            continue
        fp, q = cell.evals["fp"].metrics, cell.evals[low].metrics
        if fp.knowmem_f is None or q.knowmem_f is None:
            continue
        forgotten = (target_kf - fp.knowmem_f) if target_kf is not None else None
        back = q.knowmem_f - fp.knowmem_f
        share = back / forgotten if forgotten and forgotten > 1.0 else None
        survival = cell.survival.get(low)
        findings.append(Finding(
            cell=cell.cell, method=cell.method, adapter=cell.adapter, knowmem_f_fp=fp.knowmem_f,
            knowmem_f_low=q.knowmem_f, utility_fp=fp.knowmem_r, utility_low=q.knowmem_r, forgotten_points=forgotten,
            returned_points=back, returned_share=share,
            reverted=share is not None and share >= REVERT_SHARE and back >= REVERT_POINTS,
            nll_forget_fp=fp.nll_privleak_forget, nll_forget_low=q.nll_privleak_forget,
            survival=survival.overall if survival is not None else None))
    return findings


def finding_sentence(findings: list[Finding], low: str) -> str:
    parts = []
    for adapter, label in (("full", "Full fine-tuning"), ("lora", "LoRA (merged)")):
        group = [f for f in findings if f.adapter == adapter]
        if not group:
            continue
        reverted = [f for f in group if f.reverted]
        worst = max(group, key=lambda f: f.returned_points)
        verb = (f"reverted in {len(reverted)} of {len(group)} cells" if reverted
                else f"did not revert in any of {len(group)} cells")
        parts.append(f"{label} {verb} at {low}: KnowMem-forget rose by at most {worst.returned_points:.2f} points "
                     f"({worst.method}: {worst.knowmem_f_fp:.2f} -> {worst.knowmem_f_low:.2f}).")
    return " ".join(parts)


def plot_tradeoff(references: ReferenceCellResult, cells: list[UnlearnCellResult], low: str | None,
                  path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, cell in enumerate(cells):
        fp = cell.evals["fp"].metrics
        color = colors[i % len(colors)]
        marker = "o" if cell.adapter == "full" else "s"
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
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=120)


def build_report(out: Path, config: ExperimentConfig, references: ReferenceCellResult,
                 cells: list[UnlearnCellResult]) -> ExperimentResults:
    precisions = list(config.precisions)
    low = low_precision(precisions)
    rows = collect_rows(references, cells, precisions)
    findings = reversion_findings(references, cells, low) if low else []
    if low is None:
        sentence = "No quantized precision in the grid."
    elif not findings:
        sentence = "No finding: the grid needs KnowMem-forget (eval.metrics) and a full-precision 'fp' row."
    else:
        sentence = finding_sentence(findings, low)
    results = ExperimentResults(config=config, versions=package_versions(), git_commit=git_commit(),
                                references=references, cells=cells, rows=rows, low_precision=low,
                                findings=findings, finding=sentence)
    atomic_write_json(out / "results.json", results)
    table = table_markdown(rows)
    atomic_write_text(out / "table.md", table)
    atomic_write_text(out / "table.csv", table_csv(rows))
    plot_tradeoff(references, cells, low, out / "plots" / "tradeoff.png")
    atomic_write_text(out / "report.md", report_markdown(results, table))
    return results


def _findings_table(findings: list[Finding], low: str) -> list[str]:
    lines = ["| cell | KnowMem-f fp | KnowMem-f " + low + " | returned share | utility fp | utility " + low +
             " | forget NLL fp | forget NLL " + low + " | codes changed | projection | cosine | abs(dW)/step |",
             "|" + "---|" * 12]
    for f in findings:
        s = f.survival
        lines.append(" | ".join([
            f"| {f.cell}", _fmt(f.knowmem_f_fp), _fmt(f.knowmem_f_low), _fmt(f.returned_share),
            _fmt(f.utility_fp), _fmt(f.utility_low), _fmt(f.nll_forget_fp, 3), _fmt(f.nll_forget_low, 3),
            _fmt(s.codes_changed_frac if s else None, 3), _fmt(s.projection if s else None, 3),
            _fmt(s.cosine if s else None, 3), _fmt(s.mean_abs_dw_in_steps if s else None, 3)]) + " |")
    return lines + [
        "",
        "How to read it: *returned share* is the part of the KnowMem-forget that unlearning removed "
        f"(target fp minus cell fp) which comes back at {low}; a cell counts as reverted at "
        f">= {REVERT_SHARE:.0%} and >= {REVERT_POINTS:.0f} points. *codes changed* is the share of "
        "quantization codes that differ between Q(target) and Q(unlearned); *projection* = "
        "sum(dQ*dW)/sum(dW^2) is how much of the update's direction the quantized model keeps on average "
        "(1 = all, 0 = rounded away); *cosine* is how faithfully; *abs(dW)/step* is the mean weight change "
        "in units of the quantization step. The paper's failure mode needs a projection near 0 for full "
        "fine-tuning; a projection near 1 with a low cosine means rounding is noisy but unbiased, so the "
        "unlearning survives on average.", ""]


def report_markdown(results: ExperimentResults, table: str) -> str:
    config, low = results.config, results.low_precision
    reference = results.references.retrain_reference
    lines = [f"# qrunlearn report: {config.name}", "", "## Finding at this scale", "", results.finding, ""]
    if results.findings and low is not None:
        lines += _findings_table(results.findings, low)
    lines += [
        "## Table", "",
        "Rows: method x adapter x precision (reference rows first). VerbMem, KnowMem and Utility are ROUGE-L F1 x 100; "
        f"PrivLeak is relative to the retrain AUC {_fmt(reference.auc, 4)} ({reference.source}); "
        "forget NLL is the mean per-token NLL on privleak/forget. Survival columns are for quantized rows.", "",
        table,
        "## Plots", "",
        "- `plots/tradeoff.png`: utility vs KnowMem-forget per cell, arrow from full precision to "
        f"{low or '-'}.",
    ]
    for cell in results.cells:
        for precision, survival in cell.survival.items():
            lines.append(f"- `{survival.plot}`: per-layer survival, {cell.cell} at {precision}. {survival.verdict}")
    lines += [
        "",
        "## Run it at the paper's scale", "",
        "On GPUs, the same grid on Llama-2-7B with MUSE-News (bf16, bitsandbytes NF4 / LLM.int8 on CUDA):", "",
        f"    {GPU_COMMAND}", "",
        "Lower precisions a user can add to `precisions:` here: `rtn:w3g64`, `rtn:w2g64` (and `fp4`, `hqq:w4g64`, "
        "`rtn:w4g128`).", "",
        "## Settings", "",
        f"- seed {config.seed}; defaults `{config.defaults}`; methods {', '.join(config.methods)}; adapters "
        f"{', '.join(config.adapters)}; precisions {', '.join(config.precisions)}",
        f"- eval: limit {config.eval.limit}, batch size {config.eval.batch_size}, bootstrap {config.eval.bootstrap}",
        f"- git commit {results.git_commit}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in results.versions.items() if v),
        "- per-cell unlearning settings, losses and timings: `cells/<cell>/result.json`; every number: `results.json`",
        "",
    ]
    for cell in results.cells:
        u = cell.unlearn
        lines.append(f"- {cell.cell}: {u.epochs_run} epochs, {u.seconds:.1f} s"
                     + (f", stopped: {u.stopped_reason}" if u.stopped_reason else "")
                     + (f", selected epoch {u.selected_epoch}" if u.selected_epoch else ""))
    return "\n".join(lines) + "\n"
