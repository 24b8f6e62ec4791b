"""The main job: the paper's grid (method x strategy x precision) on one target, written cell by cell.

A *cell* is a unit of work that a scheduler can run anywhere (`qrunlearn run CONFIG --cell N`): cell 0 evaluates
the reference models (target and retrain) at every precision; each further cell unlearns one (method, strategy)
pair (strategies: full, lora, sure, quail, qat:SPEC, lora+qat:SPEC), evaluates it at every precision and computes
the survival diagnostics of every quantized precision against the target. Each finished cell writes
`cells/<id>/result.json` atomically and is skipped on a rerun; `report.build_report` turns the finished cells into
the table, plots and report.
"""

from __future__ import annotations

import gc
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers.utils import logging as hf_logging

from qrunlearn.config import RESOLVED_CONFIG_FILE, ExperimentConfig, SynthData
from qrunlearn.data.hub import export_hub_corpus
from qrunlearn.data.muse import MuseCorpus, load_corpus, write_corpus
from qrunlearn.data.synth import SynthConfig, generate_corpus
from qrunlearn.errors import UserError
from qrunlearn.eval import RETRAIN_AUC_PRESETS, EvalConfig, evaluate
from qrunlearn.eval.gradient import answer_nll_gradient
from qrunlearn.eval.muse import forget_answer_tokens
from qrunlearn.io import atomic_write_json, run_metadata, set_seed, slug
from qrunlearn.models.identity import model_identity
from qrunlearn.models.loading import load_causal_lm
from qrunlearn.models.source import MODEL_POINTER, write_model_pointer
from qrunlearn.quant import (
    FULL_PRECISION,
    QuantSpec,
    first_order,
    has_weight_codes,
    load_quantized,
    plot_survival,
    survival_report,
)
from qrunlearn.report import build_report
from qrunlearn.results import (
    CellResult,
    EvalRecord,
    ExperimentResults,
    ReferenceCellResult,
    RetrainReference,
    SurvivalRecord,
    UnlearnCellResult,
    UnlearnSummary,
    read_cell,
)
from qrunlearn.targets.build import TargetConfig, build_target_and_retrain
from qrunlearn.targets.config import BaseTargetConfig
from qrunlearn.unlearn import UnlearnResult, select_epoch, unlearn
from qrunlearn.unlearn.recipe import EpochHook
from qrunlearn.unlearn.storage import epoch_model_dir
from qrunlearn.unlearn.strategy import Strategy

PRESET_NAMES = {"news": "MUSE-News", "books": "MUSE-Books"}


@dataclass(frozen=True)
class Cell:
    index: int
    kind: Literal["reference", "unlearn"]
    method: str = ""
    strategy: Strategy = Strategy()
    seed: int | None = None  # None: the config's seed, and no seed in the id (a config without `seeds`)

    @property
    def id(self) -> str:
        if self.kind == "reference":
            return "references"
        group = f"{self.method}-{self.strategy.slug}"
        return group if self.seed is None else f"{group}-s{self.seed}"


def plan_cells(config: ExperimentConfig) -> list[Cell]:
    cells = [Cell(0, "reference")]
    for method in config.methods:
        for strategy in config.strategies:
            for seed in (config.seeds or (None,)):
                cells.append(Cell(len(cells), "unlearn", method, strategy, seed))
    return cells


def knowmem_hook(corpus: MuseCorpus, settings: EvalConfig) -> EpochHook:
    """An epoch hook scoring KnowMem-forget ({"knowmem_f": ROUGE-L F1 x 100}), the metric MUSE's selection rule
    reads; no bootstrap, no MIA."""
    quick = settings.model_copy(update={"metrics": ("knowmem_f",), "bootstrap": 1, "mia": False})

    def hook(epoch: int, model, tokenizer) -> dict[str, float]:
        return {"knowmem_f": evaluate(model, tokenizer, corpus, quick, progress=False).metrics["knowmem_f"]}

    return hook


ProgressFn = Callable[[str], None]


class Experiment:
    """Owns an output folder: data/, models/, cells/<id>/, and the aggregated outputs."""

    def __init__(self, config: ExperimentConfig, out: Path | str):
        self.config = config
        self.out = Path(out)
        self.cells = plan_cells(config)
        self._corpus: MuseCorpus | None = None
        self._target_identity: str | None = None  # known once `prepare` has the target

    # ---- preparation ------------------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.config.data.path if self.config.data.path is not None else self.out / "data"

    def corpus(self) -> MuseCorpus:
        if self._corpus is None:
            data = self.config.data
            if data.path is None and not (self.data_dir / "knowmem").exists():
                if data.hub is not None:
                    export_hub_corpus(data.hub, self.data_dir)
                else:
                    synth = data.synth or SynthData()
                    write_corpus(generate_corpus(SynthConfig(seed=synth.seed, size=synth.size)), self.data_dir)
            self._corpus = load_corpus(self.data_dir)
        return self._corpus

    def model_paths(self, progress: bool = True) -> tuple[str, str | None]:
        """Target and retrain; with synth data and none given, trains them (cached) under models/."""
        models = self.config.models
        if models.target is not None:
            return models.target, models.retrain
        if models.base is not None:
            recipe: TargetConfig | BaseTargetConfig = BaseTargetConfig(
                base=models.base, seed=self.config.seed, knowmem_prompt=self.config.eval.knowmem_prompt,
                **models.finetune.model_dump())
        elif self.config.data.is_synth:
            recipe = TargetConfig(size=models.size, seed=self.config.seed, epochs=models.epochs)
        else:
            raise UserError("config field 'models.target': required when the data is not the built-in benchmark "
                            "(or give models.base to fine-tune a pretrained model on it)")
        built = build_target_and_retrain(self.data_dir, self.out / "models", recipe, progress=progress)
        return str(built["target"].path), str(built["retrain"].path)

    def prepare(self, progress: bool = True) -> None:
        self.corpus()
        target, _ = self.model_paths(progress=progress)
        self._target_identity = model_identity(target)
        atomic_write_json(self.out / RESOLVED_CONFIG_FILE,
                          run_metadata(self.config.model_dump(mode="json"), self.config.seed))

    # ---- cells ------------------------------------------------------------------------------------------------
    def cell_dir(self, cell: Cell) -> Path:
        return self.out / "cells" / cell.id

    def load_cell(self, cell: Cell) -> CellResult | None:
        """The cell's finished result; None when it is missing or unreadable (then it is recomputed)."""
        kind = ReferenceCellResult if cell.kind == "reference" else UnlearnCellResult
        return read_cell(self.cell_dir(cell) / "result.json", kind)

    def is_done(self, cell: Cell) -> bool:
        """Finished, and (once `prepare` has run) scored against this run's target."""
        result = self.load_cell(cell)
        return result is not None and not self.is_stale(result)

    def is_stale(self, result: CellResult) -> bool:
        """A finished cell scored against a target other than the one `prepare` found: e.g. cells restored from an
        archive beside a target trained again with different bits, or a target retrained into the same folder.
        Such a cell is run again, never mixed into the report. Results that predate the record are trusted."""
        return not _same_target(result.target_identity, self._target_identity)

    def references(self) -> ReferenceCellResult:
        result = self.load_cell(self.cells[0])
        if not isinstance(result, ReferenceCellResult):
            raise UserError(f"{self.cell_dir(self.cells[0])}: the references cell is not finished")
        return result

    def finished_unlearn_results(self) -> list[UnlearnCellResult]:
        """The unlearning cells finished so far, in cell order (a partial report's)."""
        return [r for r in (self.load_cell(cell) for cell in self.cells[1:]) if isinstance(r, UnlearnCellResult)]

    def report(self, partial: bool = False) -> tuple[Path, ExperimentResults]:
        """The report rebuilt from the finished cells, and where it went: the run folder (every cell must be
        done), or with `partial` OUT/partial/ from the cells finished so far (the references cell must be done)."""
        references = self.references()
        cells = self.finished_unlearn_results() if partial else self.unlearn_results()
        if not cells:
            raise UserError(f"{self.out}: no unlearning cell is finished yet")
        self._check_one_target(references, cells)
        folder = self.out / "partial" if partial else self.out
        return folder, build_report(folder, self.config, references, cells)

    def _check_one_target(self, references: ReferenceCellResult, cells: list[UnlearnCellResult]) -> None:
        """Every cell of a report unlearned from the target its references cell evaluated (where both say which)."""
        for result in cells:
            if _same_target(result.target_identity, references.target_identity):
                continue
            index = next(cell.index for cell in self.cells if cell.id == result.cell)
            raise UserError(f"{self.out / 'cells' / result.cell / 'result.json'}: unlearned from another target "
                            f"({str(result.target_identity)[:19]}) than the references cell evaluated "
                            f"({str(references.target_identity)[:19]}); score it again with --cell {index}")

    def unlearn_results(self) -> list[UnlearnCellResult]:
        results = [self.load_cell(cell) for cell in self.cells[1:]]
        missing = [cell.id for cell, result in zip(self.cells[1:], results) if result is None]
        if missing:
            raise UserError(f"{self.out}: cells not finished: {', '.join(missing)}")
        return [r for r in results if isinstance(r, UnlearnCellResult)]

    def run_cell(self, cell: Cell, tick: ProgressFn = lambda _msg: None, force: bool = False) -> CellResult:
        finished = None if force else self.load_cell(cell)
        if finished is not None and not self.is_stale(finished):
            return finished
        for name in ("result.json", MODEL_POINTER):
            for leftover in self.cell_dir(cell).glob(f".{name}.*.tmp"):  # an earlier process killed mid-write
                leftover.unlink(missing_ok=True)
        started = time.perf_counter()
        result = (self.run_reference_cell(tick) if cell.kind == "reference"
                  else self.run_unlearn_cell(cell, tick, force=force))
        result.wall_seconds = time.perf_counter() - started
        result.meta = run_metadata(self.config.model_dump(mode="json"), self.config.seed)
        atomic_write_json(self.cell_dir(cell) / "result.json", result)
        return result

    def units(self, cell: Cell) -> int:
        """Progress units of a cell: one per evaluation, plus one for the unlearning run."""
        n = len(self.config.precisions)
        return 2 * n if cell.kind == "reference" else n + 1

    # ---- evaluation -------------------------------------------------------------------------------------------
    def _load(self, model_dir: str, precision: QuantSpec):
        if precision.is_noop:
            return load_causal_lm(model_dir, dtype=self.config.models.dtype)
        # GPTQ and AWQ calibrate on the retain documents, seeded like the run
        return load_quantized(model_dir, precision, calibration_texts=self.corpus().raw.get("retain1"),
                              calibration_seed=self.config.seed)

    def _evaluate(self, model_dir: str, precision: QuantSpec, retrain_auc: float | None) -> EvalRecord:
        model, tokenizer = self._load(model_dir, precision)
        started = time.perf_counter()
        result = evaluate(model, tokenizer, self.corpus(), self.config.eval_config(), retrain_auc=retrain_auc,
                          progress=False)
        record = EvalRecord.of(result, time.perf_counter() - started)
        del model
        gc.collect()
        return record

    def _preset(self) -> tuple[float, str] | None:
        value = self.config.models.retrain_auc
        if value is None:
            return None
        if isinstance(value, str):
            return RETRAIN_AUC_PRESETS[value], f"preset ({PRESET_NAMES[value]})"
        return value, "config value (models.retrain_auc)"

    def _measured_reference(self, retrain: str, evaluation: EvalRecord) -> RetrainReference:
        """The retrain model's AUC and KnowMem-forget; a preset AUC, when configured, takes the AUC's place."""
        measured = RetrainReference(auc=evaluation.metrics.privleak_auc, knowmem_f=evaluation.metrics.knowmem_f,
                                    source=f"retrain model at {retrain}")
        preset = self._preset()
        if preset is None:
            return measured
        return RetrainReference(auc=preset[0], knowmem_f=measured.knowmem_f, source=preset[1],
                                auc_measured=measured.auc)

    def retrain_reference(self) -> RetrainReference:
        """From the references cell when it is done, else from a preset, else measured now (and cached) so a
        lone `--cell N` still works."""
        references = self.load_cell(self.cells[0])
        if isinstance(references, ReferenceCellResult) and not self.is_stale(references):
            return references.retrain_reference
        _, retrain = self.model_paths(progress=False)
        preset = self._preset()
        if retrain is None and preset is not None:
            return RetrainReference(auc=preset[0], knowmem_f=None, source=preset[1])
        if retrain is None:
            raise UserError("config field 'models.retrain': give a retrain model or models.retrain_auc")
        # the cache is keyed by the retrain model's content: one retrained into the same folder is measured again
        identity = model_identity(retrain)
        cache = self.out / "cells" / "retrain_reference.json"
        cached = read_cell(cache, RetrainReference)
        if cached is not None and _same_target(cached.retrain_identity, identity):
            return cached
        reference = self._measured_reference(retrain, self._evaluate(retrain, FULL_PRECISION, None))
        reference = reference.model_copy(update={"retrain_identity": identity})
        atomic_write_json(cache, reference)
        return reference

    def run_reference_cell(self, tick: ProgressFn) -> ReferenceCellResult:
        target, retrain = self.model_paths(progress=False)
        retrain_evals: dict[str, EvalRecord] = {}
        if retrain is not None:
            tick("retrain @ fp")
            retrain_evals[FULL_PRECISION.label] = self._evaluate(retrain, FULL_PRECISION, None)
            reference = self._measured_reference(retrain, retrain_evals[FULL_PRECISION.label])
        else:
            preset = self._preset()
            if preset is None:
                raise UserError("config field 'models.retrain': give a retrain model or models.retrain_auc")
            reference = RetrainReference(auc=preset[0], knowmem_f=None, source=preset[1])
        target_evals = self._evaluate_everywhere("target", target, tick)
        if retrain is not None:
            retrain_evals = self._evaluate_everywhere("retrain", retrain, tick, done=retrain_evals)
        for record in (*target_evals.values(), *retrain_evals.values()):
            record.fill_privleak(reference.auc)
        return ReferenceCellResult(cell=self.cells[0].id, target=target, retrain=retrain,
                                   target_identity=model_identity(target),
                                   retrain_reference=reference, target_evals=target_evals,
                                   retrain_evals=retrain_evals)

    def _evaluate_everywhere(self, name: str, model_dir: str, tick: ProgressFn,
                             done: dict[str, EvalRecord] | None = None) -> dict[str, EvalRecord]:
        records: dict[str, EvalRecord] = {}
        for precision in self.config.precisions:
            if done and precision.label in done:
                records[precision.label] = done[precision.label]
                continue
            tick(f"{name} @ {precision}")
            records[precision.label] = self._evaluate(model_dir, precision, None)
        return records

    # ---- an unlearning cell -----------------------------------------------------------------------------------
    def run_unlearn_cell(self, cell: Cell, tick: ProgressFn, force: bool = False) -> UnlearnCellResult:
        """`force`: train again even when the cell's folder holds this run finished (else it is reused)."""
        target, _ = self.model_paths(progress=False)
        reference = self.retrain_reference()
        config = self.config.unlearn_config(cell.method, cell.strategy, cell.seed)
        if self.config.select_epoch and self.config.stop_at_selected and reference.knowmem_f is not None:
            # the epochs after MUSE's selected one would never be evaluated: stop there
            config = config.model_copy(update={"stop_knowmem_f": reference.knowmem_f})
        set_seed(config.seed)
        tick(f"{cell.id}: unlearn")
        hook = knowmem_hook(self.corpus(), self.config.eval_config()) if self.config.select_epoch else None
        result = unlearn(target, self.corpus(), config, self.cell_dir(cell) / "unlearn", epoch_hook=hook,
                         progress=False, resume=not force)
        summary = self._summary(result, reference)
        # the cell folder stands for the model its evaluations are of (MUSE's selected epoch, when one is chosen)
        write_model_pointer(self.cell_dir(cell), summary.model_dir)
        evals: dict[str, EvalRecord] = {}
        for precision in self.config.precisions:
            tick(f"{cell.id} @ {precision}")
            evals[precision.label] = self._evaluate(summary.model_dir, precision, reference.auc)
        survival = self._survival(cell, target, summary.model_dir)
        if not self.config.keep_epoch_models:
            _prune_epoch_models(result.model_dir.parent / "epochs", keep=Path(summary.model_dir))
        return UnlearnCellResult(cell=cell.id, method=cell.method, strategy=cell.strategy, seed=config.seed,
                                 unlearn_config=config,
                                 unlearn=summary, retrain_reference=reference, evals=evals, survival=survival,
                                 target_identity=model_identity(target))

    def _summary(self, result: UnlearnResult, reference: RetrainReference) -> UnlearnSummary:
        """The run, and the model to evaluate: the final one, or with `select_epoch` the first epoch whose
        KnowMem-forget is at most the retrain model's (MUSE's rule), read from the run's own epoch records."""
        model_dir, selected = result.model_dir, None
        if self.config.select_epoch and reference.knowmem_f is not None:
            selected = select_epoch(result.epochs, reference.knowmem_f)
            epoch_dir = epoch_model_dir(result.model_dir.parent, selected) if selected else None
            if epoch_dir is not None and epoch_dir.is_dir():
                model_dir = epoch_dir
        return UnlearnSummary(model_dir=str(model_dir), adapter_dir=str(result.adapter_dir or "") or None,
                              epochs_run=result.epochs_run, stopped_reason=result.stopped_reason,
                              losses=result.losses, epochs=result.epochs, selected_epoch=selected,
                              seconds=result.seconds)

    def _survival(self, cell: Cell, target: str, model_dir: str) -> dict[str, SurvivalRecord]:
        """Survival of the cell's update under every quantized precision; both models loaded once."""
        quantized = [p for p in self.config.precisions if has_weight_codes(p)]
        if not quantized:
            return {}
        base, (unlearned, tokenizer) = self._load(target, FULL_PRECISION)[0], self._load(model_dir, FULL_PRECISION)
        gradient = None
        if self.config.first_order:
            settings = self.config.eval_config()
            prompts, answers, pad = forget_answer_tokens(unlearned, tokenizer, self.corpus(), settings)
            gradient = answer_nll_gradient(unlearned, prompts, answers, pad, settings.batch_size)
        records: dict[str, SurvivalRecord] = {}
        for spec in quantized:
            report = survival_report(base, unlearned, spec)
            png = self.out / "plots" / f"survival_{cell.id}_{slug(spec.label)}.png"
            plot_survival(report, png)
            records[spec.label] = SurvivalRecord(
                **report.model_dump(), plot=str(png.relative_to(self.out)),
                first_order=first_order(base, unlearned, spec, gradient) if gradient is not None else None)
        del base, unlearned, gradient
        gc.collect()
        return records


class _CellTicker:
    """Progress inside a cell: each stage announces itself; starting a stage completes the one before it."""

    def __init__(self, describe: Callable[[str], None], advance: Callable[[], None], units: int):
        self.describe, self.advance, self.units, self.started = describe, advance, units, 0

    def __call__(self, message: str) -> None:
        self.describe(message)
        if 0 < self.started < self.units:
            self.advance()
        self.started += 1


def _same_target(identity: str | None, other: str | None) -> bool:
    """Two records of a model's identity (the target's, or the retrain's) agree, or one is unknown (results that
    predate the record are trusted)."""
    return identity is None or other is None or identity == other


def check_output_folder(out: Path, resume: bool, force: bool) -> None:
    if out.exists() and any(out.iterdir()) and not (resume or force):
        raise UserError(f"{out}: output folder is not empty; pass --resume to continue it or --force to redo it")


def run_experiment(config: ExperimentConfig, out: Path | str, *, resume: bool = False, force: bool = False,
                   cell_index: int | None = None, prepare_only: bool = False, progress: bool = True) -> Path:
    """Run the grid (or one cell) with a live progress display; aggregate when every cell is done."""
    hf_logging.disable_progress_bar()  # per-load/save bars would break the grid's own live display
    out = Path(out)
    if cell_index is None and not prepare_only:
        check_output_folder(out, resume, force)
    experiment = Experiment(config, out)
    if cell_index is not None and not 0 <= cell_index < len(experiment.cells):
        raise UserError(f"--cell {cell_index}: out of range (this config has cells 0..{len(experiment.cells) - 1})")
    experiment.prepare(progress=progress)
    if prepare_only:
        return out
    todo = [experiment.cells[cell_index]] if cell_index is not None else experiment.cells
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("grid", total=sum(experiment.units(c) for c in todo))
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
        experiment.report()
    return out


def _prune_epoch_models(epochs: Path, keep: Path) -> None:
    """Remove the per-epoch model folders under `epochs` except `keep` (the evaluated one): they served MUSE's
    epoch selection, and a cell's results never read them again."""
    if not epochs.is_dir():
        return
    for folder in sorted(epochs.iterdir()):
        if folder.is_dir() and folder.resolve() != keep.resolve():
            shutil.rmtree(folder)
