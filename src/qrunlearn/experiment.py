"""The main job: the paper's grid (method x adapter x precision) on one target, written cell by cell.

A *cell* is a unit of work that a scheduler can run anywhere (`qrunlearn run CONFIG --cell N`):
cell 0 evaluates the reference models (target and retrain) at every precision; each further cell unlearns one
(method, adapter) pair, evaluates it at every precision and computes the survival diagnostics of every
quantized precision against the target. Each finished cell writes `cells/<id>/result.json` atomically and is
skipped on a rerun; `report.build_report` turns the finished cells into the table, plots and report.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from qrunlearn.config import ExperimentConfig, split_method
from qrunlearn.data.muse import MuseCorpus, load_corpus, write_corpus
from qrunlearn.errors import UserError
from qrunlearn.io import atomic_write_json, atomic_write_text, run_metadata, set_seed

FULL_PRECISION = ("fp", "none")


@dataclass(frozen=True)
class Cell:
    index: int
    kind: Literal["reference", "unlearn"]
    method: str | None = None
    adapter: str | None = None

    @property
    def id(self) -> str:
        return "references" if self.kind == "reference" else f"{self.method}-{self.adapter}"


def plan_cells(config: ExperimentConfig) -> list[Cell]:
    cells = [Cell(0, "reference")]
    for method in config.methods:
        for adapter in config.adapters:
            cells.append(Cell(len(cells), "unlearn", method, adapter))
    return cells


def is_full_precision(precision: str) -> bool:
    return precision in FULL_PRECISION


ProgressFn = Callable[[str], None]


class Experiment:
    """Owns an output folder: data/, models/, cells/<id>/, and the aggregated outputs."""

    def __init__(self, config: ExperimentConfig, out: Path | str, config_path: Path | None = None):
        self.config = config
        self.out = Path(out)
        self.config_path = config_path
        self.cells = plan_cells(config)
        self._corpus: MuseCorpus | None = None

    # -- preparation ------------------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        if self.config.data.path is not None:
            return self.config.data.path
        return self.out / "data"

    def corpus(self) -> MuseCorpus:
        if self._corpus is None:
            data = self.config.data
            if data.path is not None:
                self._corpus = load_corpus(data.path)
            elif data.hub is not None:
                from qrunlearn.data.hub import export_hub_corpus

                if not (self.data_dir / "knowmem").exists():
                    export_hub_corpus(data.hub, self.data_dir)
                self._corpus = load_corpus(self.data_dir)
            else:
                if not (self.data_dir / "knowmem").exists():
                    from qrunlearn.data.synth import SynthConfig, generate_corpus

                    synth = data.synth
                    write_corpus(generate_corpus(SynthConfig(seed=synth.seed, size=synth.size)), self.data_dir)
                self._corpus = load_corpus(self.data_dir)
        return self._corpus

    def model_paths(self, progress: bool = True) -> tuple[str, str | None]:
        """Target and retrain; with synth data and none given, trains them (cached) under models/."""
        models = self.config.models
        if models.target is not None:
            return models.target, models.retrain
        if not self.config.data.is_synth:
            raise UserError("config field 'models.target': required when the data is not the built-in benchmark")
        from qrunlearn.models.target import TargetConfig, build_target_and_retrain

        built = build_target_and_retrain(
            self.data_dir, self.out / "models",
            TargetConfig(size=models.size, seed=self.config.seed, epochs=models.epochs), progress=progress)
        return str(built["target"]["path"]), str(built["retrain"]["path"])

    def prepare(self, progress: bool = True) -> None:
        self.corpus()
        self.model_paths(progress=progress)
        atomic_write_json(self.out / "config.resolved.json",
                          run_metadata(self.config.model_dump(mode="json"), self.config.seed))

    # -- cells ------------------------------------------------------------------------------------------------
    def cell_dir(self, cell: Cell) -> Path:
        return self.out / "cells" / cell.id

    def cell_result_path(self, cell: Cell) -> Path:
        return self.cell_dir(cell) / "result.json"

    def is_done(self, cell: Cell) -> bool:
        return self.cell_result_path(cell).exists()

    def load_cell(self, cell: Cell) -> dict[str, Any] | None:
        path = self.cell_result_path(cell)
        return json.loads(path.read_text()) if path.exists() else None

    def _eval_config(self):
        from qrunlearn.eval import EvalConfig

        settings = self.config.eval
        return EvalConfig(metrics=tuple(settings.metrics), limit=settings.limit, batch_size=settings.batch_size,
                          bootstrap_samples=settings.bootstrap, seed=self.config.seed)

    def _load(self, model_dir: str, precision: str):
        from qrunlearn.models.loading import load_causal_lm
        from qrunlearn.quant import load_quantized, parse_spec

        if is_full_precision(precision):
            return load_causal_lm(model_dir, dtype=self.config.models.dtype)
        return load_quantized(model_dir, parse_spec(precision))

    def _evaluate(self, model_dir: str, precision: str, retrain_auc: float | None) -> dict[str, Any]:
        from qrunlearn.eval import evaluate

        model, tokenizer = self._load(model_dir, precision)
        started = time.perf_counter()
        result = evaluate(model, tokenizer, self.corpus(), self._eval_config(), retrain_auc=retrain_auc,
                          progress=False)
        out = result.to_dict()
        out["wall_seconds"] = time.perf_counter() - started
        del model
        gc.collect()
        return out

    def retrain_reference(self) -> dict[str, float | None]:
        """The retrain model's full-precision AUC and KnowMem-forget: from the references cell when it is done,
        else from a preset, else measured now (and cached) so a lone `--cell N` still works."""
        models = self.config.models
        references = self.load_cell(self.cells[0])
        if references is not None:
            return references["retrain_reference"]
        cache = self.out / "cells" / "retrain_reference.json"
        if cache.exists():
            return json.loads(cache.read_text())
        if models.retrain_auc is not None:
            source = models.retrain_auc if isinstance(models.retrain_auc, str) else "config"
            return {"auc": self._preset_auc(), "knowmem_f": None, "source": source}
        _, retrain = self.model_paths(progress=False)
        if retrain is None:
            raise UserError("config field 'models.retrain': give a retrain model or models.retrain_auc")
        metrics = self._evaluate(retrain, "fp", None)["metrics"]
        reference = {"auc": metrics.get("privleak_auc"), "knowmem_f": metrics.get("knowmem_f"), "source": retrain}
        atomic_write_json(cache, reference)
        return reference

    def run_reference_cell(self, tick: ProgressFn) -> dict[str, Any]:
        target, retrain = self.model_paths(progress=False)
        rows: dict[str, dict[str, Any]] = {}
        reference: dict[str, Any] | None = None
        if retrain is not None:
            tick("retrain @ fp")
            fp_eval = self._evaluate(retrain, "fp", None)
            reference = {"auc": fp_eval["metrics"].get("privleak_auc"),
                         "knowmem_f": fp_eval["metrics"].get("knowmem_f"), "source": retrain}
            if self.config.models.retrain_auc is not None:  # a preset overrides the measured AUC
                reference["auc_measured"] = reference["auc"]
                reference["auc"] = self._preset_auc()
        else:
            reference = {"auc": self._preset_auc(), "knowmem_f": None, "source": "preset"}
        for name, path in (("target", target), ("retrain", retrain)):
            if path is None:
                continue
            rows[name] = {}
            for precision in self.config.precisions:
                if name == "retrain" and is_full_precision(precision):
                    result = fp_eval
                else:
                    tick(f"{name} @ {precision}")
                    result = self._evaluate(path, precision, None)
                _add_privleak(result["metrics"], reference["auc"])
                rows[name][precision] = result
        return {"cell": self.cells[0].id, "models": {"target": target, "retrain": retrain},
                "retrain_reference": reference, "evals": rows}

    def _preset_auc(self) -> float | None:
        value = self.config.models.retrain_auc
        if isinstance(value, str):
            from qrunlearn.eval import RETRAIN_AUC_PRESETS

            return RETRAIN_AUC_PRESETS[value]
        return value

    def unlearn_config(self, cell: Cell):
        from qrunlearn.unlearn import UnlearnConfig

        method, reg = split_method(cell.method)
        make = UnlearnConfig.tiny_defaults if self.config.defaults == "tiny" else UnlearnConfig.paper_defaults
        base = make(method, reg, cell.adapter)
        updates: dict[str, Any] = {"seed": self.config.seed}
        for key in (cell.adapter, cell.method, f"{cell.method}/{cell.adapter}"):  # least to most specific
            override = self.config.hparams.get(key)
            if override is not None:
                updates.update(override.model_dump(exclude_none=True))
        if self.config.select_epoch:
            updates["save_every_epoch"] = True
        return base.model_copy(update=updates) if hasattr(base, "model_copy") else _replace(base, updates)

    def run_unlearn_cell(self, cell: Cell, tick: ProgressFn) -> dict[str, Any]:
        from qrunlearn.quant import parse_spec, plot_survival, survival_report
        from qrunlearn.unlearn import select_epoch, unlearn

        target, _ = self.model_paths(progress=False)
        reference = self.retrain_reference()
        config = self.unlearn_config(cell)
        set_seed(self.config.seed)
        tick(f"{cell.id}: unlearn")
        hook = None
        epoch_metrics: list[dict[str, Any]] = []
        if self.config.select_epoch:
            from qrunlearn.eval import EvalConfig, evaluate

            quick = EvalConfig(metrics=("knowmem_f",), limit=self.config.eval.limit,
                               batch_size=self.config.eval.batch_size, bootstrap_samples=1, mia=False,
                               seed=self.config.seed)

            def hook(epoch: int, model, tokenizer) -> dict[str, Any]:
                metrics = evaluate(model, tokenizer, self.corpus(), quick, progress=False).metrics
                epoch_metrics.append({"epoch": epoch, "knowmem_f": metrics["knowmem_f"]})
                return {"knowmem_f": metrics["knowmem_f"]}

        started = time.perf_counter()
        result = unlearn(target, self.corpus(), config, self.cell_dir(cell) / "unlearn", epoch_hook=hook,
                         progress=False)
        unlearn_seconds = time.perf_counter() - started
        model_dir = str(result.model_dir)
        selected = None
        if self.config.select_epoch and reference.get("knowmem_f") is not None and epoch_metrics:
            selected = select_epoch(epoch_metrics, reference["knowmem_f"], key="knowmem_f")
            if selected is not None:
                epoch_dir = Path(result.model_dir).parent / "epochs" / f"epoch_{selected:03d}"
                if epoch_dir.exists():
                    model_dir = str(epoch_dir)

        evals: dict[str, Any] = {}
        survival: dict[str, Any] = {}
        pair = None  # (target, unlearned) at full precision, loaded once for every quantizer's survival report
        for precision in self.config.precisions:
            tick(f"{cell.id} @ {precision}")
            evals[precision] = self._evaluate(model_dir, precision, reference["auc"])
            if not is_full_precision(precision):
                if pair is None:
                    pair = (self._load(target, "fp")[0], self._load(model_dir, "fp")[0])
                report = survival_report(*pair, parse_spec(precision))
                survival[precision] = report.to_dict()
                png = self.out / "plots" / f"survival_{cell.id}_{_slug(precision)}.png"
                plot_survival(report, png)
                survival[precision]["plot"] = str(png.relative_to(self.out))
        del pair
        gc.collect()
        return {
            "cell": cell.id, "method": cell.method, "adapter": cell.adapter,
            "unlearn_config": config.model_dump(mode="json") if hasattr(config, "model_dump") else vars(config),
            "unlearn": {"model_dir": model_dir, "adapter_dir": str(result.adapter_dir) if result.adapter_dir else None,
                        "epochs_run": result.epochs_run, "stopped_reason": result.stopped_reason,
                        "losses": result.losses, "seconds": unlearn_seconds,
                        "epoch_metrics": epoch_metrics, "selected_epoch": selected},
            "retrain_reference": reference, "evals": evals, "survival": survival,
        }

    def run_cell(self, cell: Cell, tick: ProgressFn = lambda _msg: None, force: bool = False) -> dict[str, Any]:
        if self.is_done(cell) and not force:
            return self.load_cell(cell)
        started = time.perf_counter()
        result = self.run_reference_cell(tick) if cell.kind == "reference" else self.run_unlearn_cell(cell, tick)
        result["wall_seconds"] = time.perf_counter() - started
        result["meta"] = run_metadata(self.config.model_dump(mode="json"), self.config.seed)
        atomic_write_json(self.cell_result_path(cell), result)
        return result

    def units(self, cell: Cell) -> int:
        """Progress units of a cell: one per evaluation, plus one for the unlearning run."""
        n = len(self.config.precisions)
        return 2 * n if cell.kind == "reference" else n + 1


class _CellTicker:
    """Progress inside a cell: each stage announces itself; starting a stage completes the one before it."""

    def __init__(self, describe: Callable[[str], None], advance: Callable[[], None], units: int):
        self.describe, self.advance, self.units, self.started = describe, advance, units, 0

    def __call__(self, message: str) -> None:
        self.describe(message)
        if 0 < self.started < self.units:
            self.advance()
        self.started += 1


def _add_privleak(metrics: dict[str, Any], retrain_auc: float | None) -> None:
    """Reference rows are evaluated before the retrain AUC is known; fill PrivLeak in afterwards."""
    from qrunlearn.eval.mia import privleak

    auc = metrics.get("privleak_auc")
    if retrain_auc and auc is not None and metrics.get("privleak") is None:
        metrics["privleak"] = privleak(auc, retrain_auc)


def _replace(obj, updates: dict[str, Any]):
    from dataclasses import replace

    return replace(obj, **updates)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text)


def check_output_folder(out: Path, resume: bool, force: bool) -> None:
    if out.exists() and any(out.iterdir()) and not (resume or force):
        raise UserError(f"{out}: output folder is not empty; pass --resume to continue it or --force to redo it")


def run_experiment(config: ExperimentConfig, out: Path | str, *, resume: bool = False, force: bool = False,
                   cell_index: int | None = None, prepare_only: bool = False, progress: bool = True,
                   config_path: Path | None = None) -> Path:
    """Run the grid (or one cell) with a live progress display; aggregate when every cell is done."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from qrunlearn.report import build_report

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-load/save bars would break the grid's own live display
    out = Path(out)
    if cell_index is None and not prepare_only:
        check_output_folder(out, resume, force)
    experiment = Experiment(config, out, config_path)
    if cell_index is not None and not 0 <= cell_index < len(experiment.cells):
        raise UserError(f"--cell {cell_index}: out of range (this config has cells 0..{len(experiment.cells) - 1})")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    experiment.prepare(progress=progress)
    if prepare_only:
        return out
    todo = [experiment.cells[cell_index]] if cell_index is not None else experiment.cells
    total = sum(experiment.units(c) for c in todo)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("grid", total=total)
        for cell in todo:
            if experiment.is_done(cell) and not force:
                bar.advance(task, experiment.units(cell))
                continue
            started_units = bar.tasks[0].completed
            tick = _CellTicker(lambda message: bar.update(task, description=message),
                               lambda: bar.advance(task, 1), experiment.units(cell))
            experiment.run_cell(cell, tick, force=force)
            bar.update(task, completed=started_units + experiment.units(cell), description=f"{cell.id} done")
    if all(experiment.is_done(c) for c in experiment.cells):
        build_report(experiment)
    return out
