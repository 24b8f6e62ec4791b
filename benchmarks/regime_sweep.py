"""The paper's mechanism tested directly: does quantization give back the forgetting of full fine-tuning when its
update is small against the quantization step? A sweep of the full-FT learning rate (epochs fixed), each lr a grid
of its own sharing one prepared target and retrain, LoRA at its own lr beside them, every cell over several seeds;
then the precision-matched KnowMem-forget reversion (95% interval over seeds and items) at each quantizer against the
update's mean |dW| in quantization steps and the share of codes it changed.

    .venv/bin/python benchmarks/regime_sweep.py --out runs/regime                  # the built-in benchmark
    .venv/bin/python benchmarks/regime_sweep.py --config configs/smollm2.yaml --out runs/regime-smollm2 \\
        --lrs 3e-6 1e-5 3e-5 1e-4 3e-4 --precisions fp nf4 rtn:w4g64

    .venv/bin/python benchmarks/regime_sweep.py --config configs/smollm2-regime-seeds.yaml \
        --out runs/regime-seeds-npo --methods npo_gdr --no-lora --lrs 1e-5 1e-4 3e-4 3e-6 \
        --precisions fp nf4 rtn:w4g64 --reuse-run runs/smollm2-seeds/partial     # 70 questions, 3 seeds

Resumable: each lr's grid lives in OUT/full_lr_<lr>/ and skips its finished cells, so a killed sweep continues where
it stopped (run it again with the same arguments). Or by cells: `--write-configs` writes each lr's config to
OUT/full_lr_<lr>/config.yaml and prints the `benchmarks/run_cells.sh` queues for its unfinished cells (one thread a
cell, each finished cell archived at once, two queues side by side); `--collect-only` then builds the outputs.
`--reuse-run` adds a finished grid's cells with the same settings (its full fine-tuning and LoRA at their own lrs)
as points; `--no-lora` leaves LoRA out of both (run with it, then collect without it to plot the grid's LoRA beside).
`--pool OTHER_OUT` (with `--collect-only`) adds a second correlation table: this sweep's diagnostic pairs pooled with
another sweep's (e.g. GA+GDR's with NPO+GDR's), whether a diagnostic predicts across methods.
Each correlation table gives every diagnostic over all the quantizers' pairs and within each quantizer (pooled
over quantizers, a rank can order the quantizers rather than the cells). Writes OUT/regime.md, OUT/regime.csv and
OUT/plots/regime.png.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import yaml
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from qrunlearn.config import ExperimentConfig, load_config, load_resolved_config
from qrunlearn.eval.effect import Estimate, Verdict
from qrunlearn.experiment import Experiment, run_experiment
from qrunlearn.io import atomic_write_text
from qrunlearn.plotting import pyplot, save_figure
from qrunlearn.quant import is_full_precision
from qrunlearn.report import (
    Measurement,
    Pairs,
    by_chance,
    correlations_of,
    diagnostic_pairs_by_precision,
    pooled_pairs,
)
from qrunlearn.results import ExperimentResults, Row

RUNS = Path(__file__).resolve().parent.parent / "runs"  # benchmarks/run_cells.sh's run folders
ALL = "all"  # the pairs of every quantizer of the sweep together, beside each quantizer's own
# "all" or one quantizer's label -> its pairs: a correlation pooled over quantizers can rank the quantizers (how hard
# each one rounds) rather than the cells, so each quantizer's own is shown beside it
ByQuantizer = dict[str, Pairs]
# the point's fields that are estimates with an interval (written to the csv as value, _low, _high)
ESTIMATES = ("forgetting_fp", "reversion", "answer_nll_forgetting_fp", "answer_nll_reversion")


@dataclass(frozen=True)
class RegimePoint:
    """One point of the sweep: a (method, strategy, quantizer) row of one run, pooled over its seeds."""

    run: str  # which run: "full lr 1e-05", or a reused grid's
    lr: float | None
    method: str
    strategy: str
    precision: str
    seeds: int
    verdict: Verdict | None
    forgetting_fp: Estimate | None  # KnowMem-forget points forgotten at the anchor
    reversion: Estimate | None  # KnowMem-forget, precision-matched
    answer_nll_forgetting_fp: Estimate | None
    answer_nll_reversion: Estimate | None
    dw_steps: float | None  # mean |dW| in quantization steps
    codes_changed: float | None
    relative_error: float | None
    utility: float | None  # KnowMem-retain


def sub_config(base: ExperimentConfig, prepared: Experiment, *, strategy: str, lr: float | None,
               args: argparse.Namespace) -> ExperimentConfig:
    """One lr's grid: the base config's settings, on the prepared data and models, with the sweep's axes."""
    target, retrain = prepared.model_paths(progress=False)
    hparams = {key: value.model_dump(exclude_none=True) for key, value in base.hparams.items()}
    adapter = "full" if strategy == "full" else "lora"
    hparams[adapter] = {**hparams.get(adapter, {}), **({"lr": lr} if lr is not None else {}),
                        **({"epochs": args.epochs} if args.epochs else {})}
    raw = base.model_dump(mode="json", exclude={"hparams"})
    raw.update(data={"path": str(prepared.data_dir)},
               models={**raw["models"], "target": target, "retrain": retrain, "base": None},
               methods=list(args.methods), strategies=[strategy], precisions=list(args.precisions),
               seeds=list(args.seeds), hparams=hparams)
    return ExperimentConfig.model_validate(raw)


def share_references(out: Path, folder: Path, precisions: list[str], grids: Sequence[Path] = ()) -> None:
    """Every run of the sweep evaluates the same target and retrain on the same data and precisions: the first
    finished references cell serves them all (copied in, so each run folder stays complete on its own), the sweep's
    own or a reused grid's (same target and eval settings) that evaluated every precision of the sweep."""
    mine = folder / "cells" / "references" / "result.json"
    if mine.is_file():
        return
    found = sorted(out.glob("*/cells/references/result.json")) + [
        grid / "cells" / "references" / "result.json" for grid in grids]
    for done in found:
        if done.is_file() and set(precisions) <= set(json.loads(done.read_text()).get("target_evals", {})):
            mine.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(done, mine)
            return


def run_folder(out: Path, label: str) -> Path:
    return out / label.replace(" ", "_").replace("(", "").replace(")", "")


def grid_folder(reused: Path) -> Path:
    """The run folder of a --reuse-run (given as the run or as its report --partial folder)."""
    return reused.parent if reused.name == "partial" else reused


def write_configs(args: argparse.Namespace, base: ExperimentConfig, prepared: Experiment,
                  runs: list[tuple[str, str, float | None]]) -> None:
    """Each run's grid config as OUT/<run>/config.yaml, for `benchmarks/run_cells.sh` queues (one thread a cell,
    each finished cell archived at once) instead of this script's one run after another."""
    for label, strategy, lr in runs:
        folder = run_folder(args.out, label)
        config = sub_config(base, prepared, strategy=strategy, lr=lr, args=args)
        share_references(args.out, folder, list(args.precisions), [grid_folder(r) for r in args.reuse_run])
        atomic_write_text(folder / "config.yaml", yaml.safe_dump(config.model_dump(mode="json", exclude_none=True),
                                                                   sort_keys=False))
        queued = Experiment(config, folder)
        # is_done, not a file test: an unreadable result.json is a cell to run again, so it belongs in the queue.
        cells = " ".join(str(cell.index) for cell in queued.cells if not queued.is_done(cell))
        try:
            name = str(folder.resolve().relative_to(RUNS.resolve()))
        except ValueError:
            name = f"(under {RUNS}: {folder})"
        print(f"benchmarks/run_cells.sh {folder / 'config.yaml'} {name} {cells or '(every cell done)'}")


def rebuild_report(folder: Path) -> tuple[Path, ExperimentResults] | None:
    """The run's report again from its finished cells, with this code's measurement and the config it recorded:
    in the run folder once every cell is done, else a partial one in FOLDER/partial/ (None: no cell finished)."""
    config = load_resolved_config(folder)
    if config is None:
        return None
    finished = Experiment(config, folder)
    done = [finished.is_done(cell) for cell in finished.cells]
    if not done[0] or not any(done[1:]):
        return None
    return finished.report(partial=not all(done))


def run_pairs_by_quantizer(folder: Path, *, methods: set[str] | None = None, strategies: set[str] | None = None,
                           precisions: set[str] | None = None) -> dict[str, Pairs]:
    """Each diagnostic beside the measured reversion, per (cell, quantizer) of one finished run (of the given
    methods, strategies and quantizers only, for a reused grid), grouped by quantizer."""
    results = ExperimentResults.model_validate_json((folder / "results.json").read_text())
    config = results.config
    measure = Measurement(references=results.references, resamples=config.eval.bootstrap, seed=config.seed,
                          threshold=config.reversion_threshold)
    cells = [cell for cell in results.cells if (methods is None or cell.method in methods)
             and (strategies is None or str(cell.strategy) in strategies)]
    labels = [spec.label for spec in config.precisions]
    return diagnostic_pairs_by_precision(measure, cells, [
        label for label in labels if precisions is None or label in precisions or is_full_precision(label)])


def run_pairs(folder: Path, *, methods: set[str] | None = None, strategies: set[str] | None = None,
              precisions: set[str] | None = None) -> Pairs:
    """`run_pairs_by_quantizer`, every quantizer together."""
    return pooled_pairs(run_pairs_by_quantizer(folder, methods=methods, strategies=strategies, precisions=precisions))


def quantizer_pairs(folder: Path, quantizers: Sequence[str], *, methods: set[str] | None = None,
                    strategies: set[str] | None = None) -> ByQuantizer:
    """run_pairs over the given quantizers together (ALL) and within each one, from one pass over the run."""
    by_quantizer = run_pairs_by_quantizer(folder, methods=methods, strategies=strategies, precisions=set(quantizers))
    return {ALL: pooled_pairs(by_quantizer), **{quantizer: by_quantizer.get(quantizer, {}) for quantizer in quantizers}}


def quantizers_of(args: argparse.Namespace) -> list[str]:
    return [precision for precision in args.precisions if not is_full_precision(precision)]


def reused_strategies(args: argparse.Namespace) -> set[str]:
    return {"full"} | (set() if args.no_lora else {"lora"})


def reused_points(folder: Path, args: argparse.Namespace) -> tuple[list[RegimePoint], ByQuantizer]:
    """A finished grid run with the sweep's base settings (e.g. the seeds grid: its full fine-tuning is the sweep's
    point at the config's lr, its LoRA the LoRA point): its rows and pairs of the sweep's methods and quantizers."""
    config = ExperimentResults.model_validate_json((folder / "results.json").read_text()).config
    methods, precisions = set(args.methods), set(args.precisions)
    name = folder.parent.name if folder.name == "partial" else folder.name
    strategies = reused_strategies(args)
    points: list[RegimePoint] = []
    for strategy in sorted(strategies & {str(s) for s in config.strategies}):
        for method in sorted(methods & set(config.methods)):
            lr = config.unlearn_config(method, strategy).lr
            points += collect(folder, f"{strategy} lr {lr:g} ({name})", lr, methods={method},
                              strategy=strategy, precisions=precisions)
    return points, quantizer_pairs(folder, quantizers_of(args), methods=methods, strategies=strategies)


def pooled_sweep_pairs(sweeps: Sequence[Path], reused: Sequence[Path], args: argparse.Namespace) -> ByQuantizer:
    """Every finished run of other sweeps (their OUT folders: each lr's run, partial ones too) as diagnostic pairs,
    with the reused grids' cells of those sweeps' methods: pooled with this sweep's own pairs, the correlations
    across methods (e.g. NPO+GDR's sweep pooled with GA+GDR's, both reusing the seeds grid)."""
    pairs: ByQuantizer = {}
    methods: set[str] = set()
    for sweep in sweeps:
        for folder in sorted(path for path in sweep.iterdir() if path.is_dir() and path.name != "base"):
            rebuilt = rebuild_report(folder)
            if rebuilt is None:
                continue
            where, results = rebuilt
            methods |= set(results.config.methods)
            _pool(pairs, quantizer_pairs(where, quantizers_of(args)))
    extra = methods - set(args.methods)  # this sweep's own methods are in its own pairs already
    if extra:
        for folder in reused:
            _pool(pairs, quantizer_pairs(folder, quantizers_of(args), methods=extra,
                                         strategies=reused_strategies(args)))
    return pairs


def correlation_lines(pairs: ByQuantizer) -> list[str]:
    """Each diagnostic's rank correlation over every quantizer's pairs ("all"), then within each quantizer, and how
    many of the within-quantizer intervals exclude 0 against the ~1 in 20 that would by chance."""
    lines = ["| quantizer | diagnostic | reversion of | Spearman rho [95% CI] | pairs | predicts |",
             "|---|---|---|---|---|---|"]
    within = []
    for quantizer in sorted(pairs, key=lambda q: (q != ALL, q)):
        for c in correlations_of(pairs[quantizer], precision=None if quantizer == ALL else quantizer):
            lines.append(f"| {quantizer} | {c.diagnostic} | {c.target} | {_est(c.rho)} | {c.pairs} | "
                         f"{'yes' if c.predicts else 'no'} |")
            if quantizer != ALL and c.rho.value is not None:
                within.append(c)
    if within:
        excluding = [f"{c.precision} {c.diagnostic} vs {c.target} {_est(c.rho)}" for c in within if c.predicts]
        lines += ["", f"Within one quantizer, {len(excluding)} of {len(within)} intervals exclude 0 "
                      f"({by_chance(len(within))})" + (": " + "; ".join(excluding) if excluding else "") + "."]
    return lines


def collect(out: Path, label: str, lr: float | None, *, methods: set[str] | None = None,
            strategy: str | None = None, precisions: set[str] | None = None) -> list[RegimePoint]:
    """The sweep's points from one finished run's rows; the filters pick a reused grid's rows."""
    results = ExperimentResults.model_validate_json((out / "results.json").read_text())
    points: list[RegimePoint] = []
    for row in results.rows:
        if not row.group or is_full_precision(row.precision) or row.effects is None:
            continue
        if ((methods is not None and row.method not in methods) or (strategy is not None and row.strategy != strategy)
                or (precisions is not None and row.precision not in precisions)):
            continue
        knowmem = row.effects.knowmem_f
        anchor = next(r for r in results.rows if r.group == row.group and r.precision == row.anchor)
        anchor_effect = anchor.effects.knowmem_f.effect if anchor.effects and anchor.effects.knowmem_f else None
        nll_anchor = anchor.effects.knowmem_f_answer_nll if anchor.effects else None
        points.append(RegimePoint(
            run=label, lr=lr, method=row.method, strategy=row.strategy, precision=row.precision, seeds=len(row.seeds),
            verdict=row.verdict, forgetting_fp=anchor_effect, reversion=knowmem.reversion if knowmem else None,
            answer_nll_forgetting_fp=nll_anchor.effect if nll_anchor else None,
            answer_nll_reversion=_part(row, "knowmem_f_answer_nll"),
            dw_steps=row.survival.mean_abs_dw_in_steps if row.survival else None,
            codes_changed=row.survival.codes_changed_frac if row.survival else None,
            relative_error=row.survival.relative_error if row.survival else None,
            utility=row.metrics.knowmem_r))
    return points


def _part(row: Row, metric: str) -> Estimate | None:
    found = getattr(row.effects, metric) if row.effects is not None else None
    return found.reversion if found is not None else None


def _est(value: object) -> str:
    if not isinstance(value, Estimate) or value.value is None:
        return "-"
    if value.low is None or value.high is None:
        return _num(value.value, 2)
    return f"{_num(value.value, 2)} [{_num(value.low, 2)}, {_num(value.high, 2)}]"


def _num(value: object, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{round(value, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.00"
    return "-" if value is None else str(value)


def write_outputs(out: Path, points: list[RegimePoint], timings: dict[str, float], pairs: ByQuantizer,
                  pooled: tuple[Sequence[Path], ByQuantizer] | None = None) -> None:
    header = ["run", "method", "precision", "seeds", "forgetting at fp (KnowMem-f)", "reversion KnowMem-f",
              "verdict", "forgetting at fp (answer NLL)", "reversion answer NLL", "mean |dW| / step",
              "codes changed", "relative error", "utility"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in points:
        lines.append("| " + " | ".join([
            p.run, p.method, p.precision, str(p.seeds), _est(p.forgetting_fp), _est(p.reversion), str(p.verdict),
            _est(p.answer_nll_forgetting_fp), _est(p.answer_nll_reversion), _num(p.dw_steps, 4),
            _num(p.codes_changed, 4), _num(p.relative_error), _num(p.utility, 1)]) + " |")
    lines += ["", "The diagnostics against the measured reversion, pooled over every run's (cell, seed, quantizer) "
              "pairs with a measurable effect:", "", *correlation_lines(pairs), ""]
    if pooled is not None:
        sweeps, pooled_pairs = pooled
        named = ", ".join(str(sweep) for sweep in sweeps)
        lines += [f"Pooled with the sweeps in {named} (their runs and their methods' cells of the reused grids):", "",
                  *correlation_lines(pooled_pairs), ""]
    lines.append("Wall time per run (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    atomic_write_text(out / "regime.md", "\n".join(lines) + "\n")
    buffer = io.StringIO()
    plain = [f.name for f in fields(RegimePoint) if f.name not in ESTIMATES]
    columns = [*plain, *(f"{k}{end}" for k in ESTIMATES for end in ("", "_low", "_high"))]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for p in points:
        flat: dict[str, object] = {name: getattr(p, name) for name in plain}
        for key in ESTIMATES:
            estimate = getattr(p, key)
            if isinstance(estimate, Estimate):
                flat.update({key: estimate.value, f"{key}_low": estimate.low, f"{key}_high": estimate.high})
        writer.writerow(flat)
    atomic_write_text(out / "regime.csv", buffer.getvalue())
    plot(points, out / "plots" / "regime.png")


PANELS = (("KnowMem-forget", "forgetting_fp", "reversion"),
          ("answer NLL", "answer_nll_forgetting_fp", "answer_nll_reversion"))


def _measurable(forgetting: object) -> bool:
    return isinstance(forgetting, Estimate) and forgetting.excludes(0.0) == "above"


def plot(points: list[RegimePoint], path: Path) -> None:
    """One panel per (metric, quantizer): reversion (95% interval) against mean |dW| in steps, per method, for the
    rows whose forgetting at fp is measurable (its interval excludes 0); LoRA hollow squares."""
    plt = pyplot()
    precisions = list(dict.fromkeys(p.precision for p in points))
    fig, axes = plt.subplots(len(PANELS), len(precisions), figsize=(5.5 * len(precisions), 4.0 * len(PANELS)),
                             squeeze=False)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = dict(zip(dict.fromkeys(p.method for p in points), palette))
    for (metric, forgetting_key, reversion_key), row_axes in zip(PANELS, axes):
        for ax, precision in zip(row_axes, precisions):
            here = [p for p in points if p.precision == precision and p.dw_steps is not None]
            _panel(ax, [p for p in here if _measurable(getattr(p, forgetting_key))], reversion_key, colors)
            # where it was looked for and nothing was forgotten: grey marks on the 0 line
            absent = [p for p in here if not _measurable(getattr(p, forgetting_key))]
            if absent:
                ax.scatter([p.dw_steps for p in absent], [0.0] * len(absent), marker="x", color="grey",
                           label="no measurable forgetting at fp")
            if here:
                steps = [p.dw_steps for p in here if p.dw_steps is not None]
                ax.set_xlim(min(steps) / 1.5, max(steps) * 1.5)
            # labels at 1, 2, 5 x 10^k: a sweep spanning under a decade otherwise gets crowded minor-tick labels
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            handles, labels = ax.get_legend_handles_labels()
            if handles:
                unique = dict(zip(labels, handles))
                ax.legend(unique.values(), unique.keys(), fontsize=7)
            ax.set_ylabel(f"{metric} reversion (precision-matched)")
            ax.set_title(f"{metric} at {precision}")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def _panel(ax, points: list[RegimePoint], key: str, colors: dict[str, str]) -> None:
    for p in points:
        estimate = getattr(p, key)
        if not isinstance(estimate, Estimate) or estimate.value is None or p.dw_steps is None:
            continue
        lora = p.strategy != "full"
        label = f"{p.method} {'LoRA' if lora else 'full'}"
        if estimate.low is None or estimate.high is None:
            # a point estimate without a bootstrap interval: drawn apart, never as if it were exact
            ax.scatter(p.dw_steps, estimate.value, marker="^", facecolors="none", edgecolors=colors[p.method],
                       label=f"{label} (no interval)")
            continue
        spread = [[estimate.value - estimate.low], [estimate.high - estimate.value]]
        ax.errorbar(p.dw_steps, estimate.value, yerr=spread, fmt="s" if lora else "o",
                    mfc="none" if lora else colors[p.method], color=colors[p.method], capsize=3, label=label)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("mean |dW| in quantization steps (log)")
    ax.grid(alpha=0.3)


def _pool(into: ByQuantizer, more: ByQuantizer) -> None:
    for quantizer, found_pairs in more.items():
        mine = into.setdefault(quantizer, {})
        for key, found in found_pairs.items():
            mine.setdefault(key, []).extend(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the base grid (default: the built-in benchmark)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3],
                        help="full fine-tuning learning rates")
    parser.add_argument("--lora-lr", type=float, default=None, help="LoRA's lr (default: its adapter default)")
    parser.add_argument("--no-lora", action="store_true",
                        help="no LoRA run of the sweep's own, and a --reuse-run grid's LoRA cells left out")
    parser.add_argument("--epochs", type=int, default=None, help="epochs for every run (default: the config's)")
    parser.add_argument("--methods", nargs="+", default=["ga_gdr", "npo_gdr"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--precisions", nargs="+", default=["fp", "nf4", "rtn:w4g64"])
    parser.add_argument("--reuse-run", type=Path, action="append", default=[],
                        help="a finished grid run on the same target, data and settings (its results.json, e.g. a "
                             "report --partial folder): its full and LoRA cells of --methods join the sweep as points "
                             "at its config's lrs")
    parser.add_argument("--pool", type=Path, action="append", default=[],
                        help="another sweep's OUT folder (with --collect-only): its runs' diagnostic pairs, and the "
                             "reused grids' cells of its methods, pooled with this sweep's into a second correlation "
                             "table in regime.md (a diagnostic across methods)")
    parser.add_argument("--collect-only", action="store_true",
                        help="rebuild each finished run's report and the sweep's outputs; run nothing")
    parser.add_argument("--write-configs", action="store_true",
                        help="write each run's config to OUT/<run>/config.yaml and print the run_cells.sh queues "
                             "that run its unfinished cells (then --collect-only); run nothing")
    args = parser.parse_args()
    base = load_config(args.config)
    prepared = Experiment(base, args.out / "base")
    if not args.collect_only:
        prepared.prepare(progress=False)
    runs: list[tuple[str, str, float | None]] = [(f"full lr {lr:g}", "full", lr) for lr in args.lrs]
    if not args.no_lora:
        runs.append((f"lora lr {args.lora_lr:g}" if args.lora_lr else "lora (default lr)", "lora", args.lora_lr))
    if args.write_configs:
        write_configs(args, base, prepared, runs)
        return
    points: list[RegimePoint] = []
    timings: dict[str, float] = {}
    pairs: ByQuantizer = {}
    references_seconds: float | None = None
    for label, strategy, lr in runs:
        folder = run_folder(args.out, label)
        if args.collect_only:
            rebuilt = rebuild_report(folder)
            if rebuilt is not None:
                where, results = rebuilt
                partial = f" (partial: {len(results.cells)} cells)" if where != folder else ""
                points += collect(where, label + partial, lr)
                _pool(pairs, quantizer_pairs(where, quantizers_of(args)))
                timings[label] = sum(cell.wall_seconds for cell in results.cells)
                references_seconds = results.references.wall_seconds  # one cell every lr shares: counted once
            continue
        config = sub_config(base, prepared, strategy=strategy, lr=lr, args=args)
        share_references(args.out, folder, list(args.precisions), [grid_folder(r) for r in args.reuse_run])
        started = time.perf_counter()
        run_experiment(config, folder, resume=True, progress=False)
        timings[label] = time.perf_counter() - started
        points += collect(folder, label, lr)
        _pool(pairs, quantizer_pairs(folder, quantizers_of(args)))
        write_outputs(args.out, points, timings, pairs)  # after each run: a partial sweep is already readable
        print(f"{label}: {timings[label]:.0f} s", flush=True)
    for folder in args.reuse_run:
        reused, reused_pairs = reused_points(folder, args)
        points += reused
        _pool(pairs, reused_pairs)
    if references_seconds is not None:
        timings["shared references"] = references_seconds
    pooled = None
    if args.pool:
        pooled_pairs: ByQuantizer = {}
        _pool(pooled_pairs, pairs)  # a copy: the sweep's own table unchanged
        _pool(pooled_pairs, pooled_sweep_pairs(args.pool, args.reuse_run, args))
        pooled = (args.pool, pooled_pairs)
    if args.collect_only or args.reuse_run:
        write_outputs(args.out, points, timings, pairs, pooled)
    print((args.out / "regime.md").read_text())
    print(json.dumps({"runs": len(runs), "points": len(points)}))


if __name__ == "__main__":
    main()
