"""Turn an experiment's finished cells into results.json, table.md / table.csv, plots and report.md."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qrunlearn.io import atomic_write_json, atomic_write_text, git_commit, package_versions

if TYPE_CHECKING:
    from qrunlearn.experiment import Experiment

COLUMNS = ("VerbMem", "KnowMem-forget", "PrivLeak", "Utility")
METRIC_KEYS = {"VerbMem": "verbmem_f", "KnowMem-forget": "knowmem_f", "PrivLeak": "privleak",
               "Utility": "knowmem_r"}
SURVIVAL_KEYS = {"codes changed": "codes_changed_frac", "projection": "projection", "cosine": "cosine",
                 "|dW| / step": "mean_abs_dw_in_steps"}
GPU_COMMAND = "accelerate launch -m qrunlearn run configs/muse-news-llama2-7b.yaml --out runs/muse-news"
# A share of the forgotten KnowMem that comes back at low precision above this is called a reversion.
REVERT_SHARE = 0.25
REVERT_POINTS = 5.0


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def low_precision(precisions: list[str] | tuple[str, ...]) -> str | None:
    """The lowest-bit quantized precision of the grid (the one the paper's claim is about)."""
    from qrunlearn.quant import parse_spec

    quantized = [p for p in precisions if p not in ("fp", "none")]
    if not quantized:
        return None
    return min(quantized, key=lambda p: parse_spec(p).bits)


def collect_rows(references: dict[str, Any], cells: list[dict[str, Any]], precisions: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in ("target", "retrain"):
        for precision in precisions:
            evaluation = references["evals"].get(name, {}).get(precision)
            if evaluation is None:
                continue
            rows.append({"method": name, "adapter": "", "precision": precision,
                         **{col: evaluation["metrics"].get(key) for col, key in METRIC_KEYS.items()},
                         "forget NLL": evaluation["metrics"].get("nll_privleak_forget")})
    for cell in cells:
        for precision in precisions:
            evaluation = cell["evals"][precision]
            row = {"method": cell["method"], "adapter": cell["adapter"], "precision": precision,
                   **{col: evaluation["metrics"].get(key) for col, key in METRIC_KEYS.items()},
                   "forget NLL": evaluation["metrics"].get("nll_privleak_forget")}
            overall = cell["survival"].get(precision, {}).get("overall")
            if overall:
                row.update({col: overall.get(key) for col, key in SURVIVAL_KEYS.items()})
            rows.append(row)
    return rows


def table_markdown(rows: list[dict[str, Any]]) -> str:
    headers = ["Method", "Adapter", "Precision", *COLUMNS, "forget NLL", *SURVIVAL_KEYS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        values = [row["method"], row["adapter"] or "-", row["precision"],
                  *(_fmt(row[c]) for c in COLUMNS), _fmt(row["forget NLL"], 3)]
        values += [_fmt(row.get(c), 3) for c in SURVIVAL_KEYS]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    fields = ["method", "adapter", "precision", *COLUMNS, "forget NLL", *SURVIVAL_KEYS]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in fields})
    return buffer.getvalue()


def reversion_findings(references: dict[str, Any], cells: list[dict[str, Any]], low: str) -> list[dict[str, Any]]:
    """Per cell: how much of the KnowMem-forget that unlearning removed comes back at the low precision."""
    target_kf = references["evals"]["target"]["fp"]["metrics"].get("knowmem_f")
    findings = []
    for cell in cells:
        fp, q = cell["evals"]["fp"]["metrics"], cell["evals"][low]["metrics"]
        forgotten = (target_kf - fp["knowmem_f"]) if target_kf is not None else None
        back = q["knowmem_f"] - fp["knowmem_f"]
        share = back / forgotten if forgotten and forgotten > 1.0 else None
        reverted = share is not None and share >= REVERT_SHARE and back >= REVERT_POINTS
        findings.append({"cell": cell["cell"], "method": cell["method"], "adapter": cell["adapter"],
                         "knowmem_f_fp": fp["knowmem_f"], "knowmem_f_low": q["knowmem_f"],
                         "utility_fp": fp["knowmem_r"], "utility_low": q["knowmem_r"],
                         "forgotten_points": forgotten, "returned_points": back, "returned_share": share,
                         "reverted": reverted,
                         "nll_forget_fp": fp.get("nll_privleak_forget"), "nll_forget_low": q.get("nll_privleak_forget"),
                         "survival": cell["survival"].get(low, {}).get("overall")})
    return findings


def finding_sentence(findings: list[dict[str, Any]], low: str) -> str:
    parts = []
    for adapter, label in (("full", "Full fine-tuning"), ("lora", "LoRA (merged)")):
        group = [f for f in findings if f["adapter"] == adapter]
        if not group:
            continue
        reverted = [f for f in group if f["reverted"]]
        worst = max(group, key=lambda f: f["returned_points"])
        verb = (f"reverted in {len(reverted)} of {len(group)} cells" if reverted
                else f"did not revert in any of {len(group)} cells")
        parts.append(f"{label} {verb} at {low}: KnowMem-forget rose by at most {worst['returned_points']:.2f} points "
                     f"({worst['method']}: {worst['knowmem_f_fp']:.2f} -> {worst['knowmem_f_low']:.2f}).")
    return " ".join(parts)


def _plot_tradeoff(references: dict[str, Any], cells: list[dict[str, Any]], low: str | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, cell in enumerate(cells):
        fp = cell["evals"]["fp"]["metrics"]
        color = colors[i % len(colors)]
        marker = "o" if cell["adapter"] == "full" else "s"
        ax.scatter(fp["knowmem_f"], fp["knowmem_r"], color=color, marker=marker, label=cell["cell"])
        if low is not None:
            q = cell["evals"][low]["metrics"]
            ax.annotate("", xy=(q["knowmem_f"], q["knowmem_r"]), xytext=(fp["knowmem_f"], fp["knowmem_r"]),
                        arrowprops={"arrowstyle": "->", "color": color})
    for name, marker in (("target", "*"), ("retrain", "P")):
        evaluation = references["evals"].get(name, {}).get("fp")
        if evaluation:
            ax.scatter(evaluation["metrics"]["knowmem_f"], evaluation["metrics"]["knowmem_r"], color="black",
                       marker=marker, s=120, label=f"{name} (fp)")
    ax.set_xlabel("KnowMem on forget (lower = more forgotten)")
    ax.set_ylabel("Utility = KnowMem on retain")
    ax.set_title("Unlearning cells: full precision -> " + (low or "(no quantized precision)"))
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def build_report(experiment: "Experiment") -> dict[str, Any]:
    out = experiment.out
    config = experiment.config
    references = experiment.load_cell(experiment.cells[0])
    cells = [experiment.load_cell(c) for c in experiment.cells[1:]]
    precisions = list(config.precisions)
    low = low_precision(precisions)
    rows = collect_rows(references, cells, precisions)
    findings = reversion_findings(references, cells, low) if low else []
    sentence = finding_sentence(findings, low) if low else "No quantized precision in the grid."

    results = {"config": config.model_dump(mode="json"), "versions": package_versions(), "git_commit": git_commit(),
               "references": references, "cells": cells, "rows": rows, "low_precision": low,
               "findings": findings, "finding": sentence}
    atomic_write_json(out / "results.json", results)
    table = table_markdown(rows)
    atomic_write_text(out / "table.md", table)
    atomic_write_text(out / "table.csv", table_csv(rows))
    _plot_tradeoff(references, cells, low, out / "plots" / "tradeoff.png")
    atomic_write_text(out / "report.md", report_markdown(experiment, references, cells, table, findings, sentence, low))
    return results


def report_markdown(experiment: "Experiment", references, cells, table: str, findings, sentence: str,
                    low: str | None) -> str:
    config = experiment.config
    versions = package_versions()
    reference = references["retrain_reference"]
    lines = [
        f"# qrunlearn report: {config.name}", "",
        "## Finding at this scale", "", sentence, "",
    ]
    if findings:
        lines += ["| cell | KnowMem-f fp | KnowMem-f " + low + " | returned share | utility fp | utility " + low +
                  " | forget NLL fp | forget NLL " + low + " | codes changed | projection | cosine | abs(dW)/step |",
                  "|" + "---|" * 12]
        for f in findings:
            s = f["survival"] or {}
            lines.append(" | ".join([
                f"| {f['cell']}", _fmt(f["knowmem_f_fp"]), _fmt(f["knowmem_f_low"]), _fmt(f["returned_share"]),
                _fmt(f["utility_fp"]), _fmt(f["utility_low"]), _fmt(f["nll_forget_fp"], 3), _fmt(f["nll_forget_low"], 3),
                _fmt(s.get("codes_changed_frac"), 3), _fmt(s.get("projection"), 3), _fmt(s.get("cosine"), 3),
                _fmt(s.get("mean_abs_dw_in_steps"), 3)]) + " |")
        lines += ["",
                  "How to read it: *returned share* is the part of the KnowMem-forget that unlearning removed "
                  f"(target fp minus cell fp) which comes back at {low}; a cell counts as reverted at "
                  f">= {REVERT_SHARE:.0%} and >= {REVERT_POINTS:.0f} points. *codes changed* is the share of "
                  "quantization codes that differ between Q(target) and Q(unlearned); *projection* = "
                  "sum(dQ*dW)/sum(dW^2) is how much of the update's direction the quantized model keeps on average "
                  "(1 = all, 0 = rounded away); *cosine* is how faithfully; *abs(dW)/step* is the mean weight change "
                  "in units of the quantization step. The paper's failure mode needs a projection near 0 for full "
                  "fine-tuning; a projection near 1 with a low cosine means rounding is noisy but unbiased, so the "
                  "unlearning survives on average.", ""]
    lines += [
        "## Table", "",
        "Rows: method x adapter x precision (reference rows first). VerbMem, KnowMem and Utility are ROUGE-L F1 x 100; "
        f"PrivLeak is relative to the retrain AUC {_fmt(reference.get('auc'), 4)} ({reference.get('source')}); "
        "forget NLL is the mean per-token NLL on privleak/forget. Survival columns are for quantized rows.", "",
        table,
        "## Plots", "",
        "- `plots/tradeoff.png`: utility vs KnowMem-forget per cell, arrow from full precision to "
        f"{low or '-'}.",
    ]
    for cell in cells:
        for precision, survival in cell["survival"].items():
            lines.append(f"- `{survival['plot']}`: per-layer survival, {cell['cell']} at {precision}. "
                         f"{survival.get('verdict', '')}")
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
        f"- git commit {git_commit()}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
        "- per-cell unlearning settings, losses and timings: `cells/<cell>/result.json`; every number: `results.json`",
        "",
    ]
    for cell in cells:
        u = cell["unlearn"]
        lines.append(f"- {cell['cell']}: {u['epochs_run']} epochs, {u['seconds']:.1f} s"
                     + (f", stopped: {u['stopped_reason']}" if u.get("stopped_reason") else "")
                     + (f", selected epoch {u['selected_epoch']}" if u.get("selected_epoch") else ""))
    return "\n".join(lines) + "\n"
