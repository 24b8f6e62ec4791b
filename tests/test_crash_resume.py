"""Crash safety of `qrunlearn run`: a grid killed at any point and continued with `--resume` ends with exactly the
numbers of an uninterrupted run; corrupt results are recomputed (only those); a full disk or a read-only folder is
one line and exit 2 with nothing already written lost; Ctrl-C exits 130 keeping the finished cells; MUSE's epoch
selection survives a resumed or reused unlearning run.

The runs that are killed go through the installed console script in subprocesses, as a user (or a scheduler's
OOM killer) meets them. Every run shares one prepared data folder and target/retrain pair (`prepared`), so a run
is just its two cells; every subprocess computes with one thread, so that all of them add floats in one order.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import qrunlearn
from qrunlearn import experiment
from qrunlearn.cli import main
from qrunlearn.io import CRASH_AT_ENV, CRASH_SIGNAL_ENV
from qrunlearn.results import UnlearnCellResult
from qrunlearn.unlearn.records import RunRecord

SCRIPT = Path(sys.executable).with_name("qrunlearn")
SOURCE_ROOT = Path(qrunlearn.__file__).resolve().parents[1]  # the checkout under test, whatever the venv points at
CELL = "ga_gdr-full"
REPORT_FILES = ("results.json", "table.md", "table.csv", "report.md")
# what may differ between two runs of one config: durations and provenance, not results
VOLATILE_KEYS = {"seconds", "wall_seconds", "timings", "meta", "versions", "git_commit", "tokens_per_second",
                 "bootstrap_seconds"}


# ---- runs -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    """The shared data folder and target/retrain models, and the run configs that point at them."""

    root: Path
    grid: Path  # 2 cells (references, ga_gdr-full), precisions fp and rtn:w4g64
    select: Path  # the same with select_epoch and precision fp only


def _config(root: Path, **changes: Any) -> dict[str, Any]:
    config = {
        "name": "crash", "seed": 0,
        "data": {"path": str(root / "data")},
        "models": {"target": str(root / "models" / "target"), "retrain": str(root / "models" / "retrain")},
        "methods": ["ga_gdr"], "strategies": ["full"], "precisions": ["fp", "rtn:w4g64"],
        "hparams": {"full": {"epochs": 3, "lr": 3e-3}},
        "eval": {"limit": 4, "batch_size": 8, "bootstrap": 20},
    }
    return {**config, **changes}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The runs in this process compute with one thread too: two small models' worth of OpenMP threads on two busy
    cores spin against each other (a 40 s test took 400 s under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Prepared:
    root = tmp_path_factory.mktemp("prepared")
    synth = root / "synth.yaml"
    synth.write_text(yaml.safe_dump({"seed": 0, "data": {"synth": {"size": "tiny", "seed": 0}},
                                     "models": {"size": "tiny", "epochs": 3}}))
    assert main(["run", str(synth), "--out", str(root), "--prepare", "--no-progress"]) == 0
    grid, select = root / "grid.yaml", root / "select.yaml"
    grid.write_text(yaml.safe_dump(_config(root)))
    # every epoch trained (no stop at the selected one): the Ctrl-C below falls in epoch 2 after a selection in 1
    select.write_text(yaml.safe_dump(_config(root, precisions=["fp"], select_epoch=True, stop_at_selected=False)))
    return Prepared(root, grid, select)


def _env(crash_at: str | None = None, interrupt: bool = False) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop(CRASH_AT_ENV, None)
    env.pop(CRASH_SIGNAL_ENV, None)
    if crash_at is not None:
        env[CRASH_AT_ENV] = crash_at
    if interrupt:
        env[CRASH_SIGNAL_ENV] = "INT"
    return env


def _start(config: Path, out: Path, *flags: str, crash_at: str | None = None,
           interrupt: bool = False) -> subprocess.Popen:
    assert SCRIPT.is_file(), f"{SCRIPT}: the qrunlearn console script is not installed in this environment"
    with out.with_name(out.name + ".stderr").open("w") as log:  # a file, not a pipe: nothing can block on it
        return subprocess.Popen([str(SCRIPT), "run", str(config), "--out", str(out), "--no-progress", *flags],
                                env=_env(crash_at, interrupt), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=log, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """A test suite started in the background (`make test &`, nohup) has SIGINT ignored, and its children inherit
    that: the run could not be interrupted. Give the child the default disposition, as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass(frozen=True)
class Finished:
    returncode: int
    stderr: str
    seconds: float


def _finish(process: subprocess.Popen, out: Path, started: float, timeout: float = 600) -> Finished:
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:  # a hung run (or a failed test): never leave it running
            process.kill()
            process.wait()
    stderr = out.with_name(out.name + ".stderr").read_text()
    return Finished(process.returncode, stderr, time.perf_counter() - started)


def run_cli(config: Path, out: Path, *flags: str, crash_at: str | None = None, interrupt: bool = False,
            signal_when: Callable[[], bool] | None = None, sig: int = signal.SIGKILL) -> Finished:
    """`qrunlearn run` in a subprocess; with `signal_when`, the file system is polled every 10 ms and `sig` sent
    the moment it holds (the process may also end first: the caller checks the return code). With `crash_at`
    the process stops itself at that point: SIGKILL, or with `interrupt` SIGINT (a Ctrl-C)."""
    started = time.perf_counter()
    process = _start(config, out, *flags, crash_at=crash_at, interrupt=interrupt)
    deadline = time.monotonic() + 600
    while signal_when is not None and process.poll() is None and time.monotonic() < deadline:
        if signal_when():
            process.send_signal(sig)
            break
        time.sleep(0.01)
    return _finish(process, out, started)


# ---- what a finished folder holds ----------------------------------------------------------------------------
def _without_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


def numbers(json_file: Path, *folders: Path) -> Any:
    """A results file without timings and provenance, the paths of `folders` (output folders whose results it may
    hold) replaced by "<out>"."""
    text = json_file.read_text()
    for folder in folders:
        text = text.replace(str(folder), "<out>")
    return _without_volatile(json.loads(text))


def assert_same_results(out: Path, expected: Path) -> None:
    for name in ("table.md", "table.csv"):
        assert (out / name).read_text() == (expected / name).read_text(), name
    for name in ("results.json", "cells/references/result.json", f"cells/{CELL}/result.json"):
        assert numbers(out / name, out, expected) == numbers(expected / name, expected), name


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _unlearn_dir(out: Path) -> Path:
    return out / "cells" / CELL / "unlearn"


def record(out: Path) -> RunRecord | None:
    """The unlearning cell's run record (unlearn.json), None while there is none."""
    try:
        return RunRecord.model_validate_json((_unlearn_dir(out) / "unlearn.json").read_text())
    except (OSError, ValueError):
        return None


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*.tmp"))


class Baseline:
    """An uninterrupted run of the grid, started in the background (the kill test runs its own grid meanwhile);
    `out()` waits for it."""

    def __init__(self, config: Path, out: Path):
        self.path, self.started = out, time.perf_counter()
        self.process = _start(config, out)
        self.finished: Finished | None = None

    def out(self) -> Path:
        if self.finished is None:
            self.finished = _finish(self.process, self.path, self.started)
            print(f"uninterrupted run: {self.finished.seconds:.1f} s")
        assert self.finished.returncode == 0, self.finished.stderr
        return self.path


@pytest.fixture(scope="module")
def baseline(prepared, tmp_path_factory) -> Iterator[Baseline]:
    started = Baseline(prepared.grid, tmp_path_factory.mktemp("baseline") / "out")
    yield started
    if started.process.poll() is None:  # no test waited for it
        started.process.kill()
        started.process.wait()


def finished_copy(baseline: Path, where: Path) -> Path:
    """A copy of the finished baseline folder (its files keep their times)."""
    out = where / "out"
    shutil.copytree(baseline, out)
    return out


# ---- 1. killed anywhere, resumed: the numbers of an uninterrupted run -------------------------------------------
def _evaluating(out: Path) -> bool:
    """The unlearning run is finished and the cell's result not yet written."""
    finished = record(out)
    result = out / "cells" / CELL / "result.json"
    return finished is not None and finished.status == "finished" and not result.exists()


def _half_written(out: Path, target: str) -> None:
    """A crash inside an atomic write leaves a partial temporary beside `target` and never a partial `target`."""
    left = [name for name in temporaries(out) if Path(name).parent == Path(target).parent
            and Path(name).name.startswith(f".{Path(target).name}.")]
    assert len(left) == 1, temporaries(out)
    with pytest.raises(json.JSONDecodeError):
        json.loads((out / left[0]).read_text())  # cut mid-way, as a crash leaves it
    assert not (out / target).exists()


def _swap_cut(out: Path) -> None:
    """A kill between the two renames of a checkpoint swap: no checkpoint folder, its old copy beside it."""
    unlearn_dir = _unlearn_dir(out)
    assert not (unlearn_dir / "checkpoint").exists()
    assert len(list(unlearn_dir.glob(".checkpoint.old-*"))) == 1 and (unlearn_dir / ".checkpoint.tmp").is_dir()


@pytest.mark.slow  # a grid killed and resumed in subprocesses: 1-3 min; .ci/run runs the slow tests too
def test_killed_at_every_stage_then_resumed_gives_the_uninterrupted_numbers(prepared, baseline, tmp_path):
    out, grid = tmp_path / "out", prepared.grid
    seconds: dict[str, float] = {}

    def kill(stage: str, *, crash_at: str | None = None, signal_when: Callable[[], bool] | None = None) -> None:
        flags = ("--resume",) if out.exists() else ()
        killed = run_cli(grid, out, *flags, crash_at=crash_at, signal_when=signal_when)
        seconds[stage] = round(killed.seconds, 1)
        assert killed.returncode == -signal.SIGKILL, f"{stage}: ended before its kill point:\n{killed.stderr}"

    # fault injection where a write or rename is too short to hit by polling the file system
    kill("writing references/result.json", crash_at="write:references/result.json")
    _half_written(out, "cells/references/result.json")
    kill("swapping in the epoch-2 checkpoint", crash_at="swap:unlearn/checkpoint")
    _swap_cut(out)
    # the epoch-1 checkpoint is put back; training resumes after epoch 1 and is killed after the epoch-2 checkpoint
    # (killed by itself right after that save: polling for it could miss the moment on a loaded machine)
    kill("training", crash_at="saved:unlearn/checkpoint")
    assert (out / "cells" / "references" / "result.json").is_file() and record(out) is None
    kill("evaluating", signal_when=lambda: _evaluating(out))
    finished = record(out)
    assert finished is not None and finished.status == "finished"
    # each resume continued from the checkpoint rather than training again from the start
    assert finished.progress.resumed_after == [1, 2]
    for target in (f"cells/{CELL}/result.json", "table.md"):
        kill(f"writing {target}", crash_at=f"write:{target.removeprefix('cells/')}")
        _half_written(out, target)
    assert (out / "results.json").is_file()  # the report had begun: results.json is written before table.md

    resumed = run_cli(grid, out, "--resume")
    seconds["final resume"] = round(resumed.seconds, 1)
    assert resumed.returncode == 0, resumed.stderr
    assert all((out / name).is_file() for name in REPORT_FILES)
    assert_same_results(out, baseline.out())
    # nothing the kills left behind stays: no checkpoint, no old copies, no temporaries in the cells
    assert not (_unlearn_dir(out) / "checkpoint").exists()
    assert not list((out / "cells").rglob(".*.old-*")) and temporaries(out / "cells") == []
    print("kill points (seconds of each killed run):", seconds)


# ---- 2. a corrupt result is recomputed, and only it ---------------------------------------------------------------
def _truncate(text: str) -> str:
    return text[: len(text) // 2]


def _invalid_json(text: str) -> str:
    return text.replace(":", "=", 1)


@pytest.mark.parametrize(("damage", "cell"), [(_truncate, CELL), (_invalid_json, "references")],
                         ids=["truncated-unlearn-cell", "invalid-json-references"])
def test_a_corrupt_result_is_recomputed_and_nothing_else(damage, cell, prepared, baseline, tmp_path):
    out = finished_copy(baseline.out(), tmp_path)
    result = out / "cells" / cell / "result.json"
    result.write_text(damage(result.read_text()))
    damaged = result.stat().st_mtime_ns
    others = {path: mtime for path, mtime in mtimes(out / "cells").items() if path != f"{cell}/result.json"}

    started = time.perf_counter()
    finished = run_cli(prepared.grid, out, "--resume")
    assert finished.returncode == 0, finished.stderr
    print(f"{cell} recomputed in {time.perf_counter() - started:.1f} s")
    after = mtimes(out / "cells")
    assert after[f"{cell}/result.json"] > damaged  # recomputed ...
    assert {path: after[path] for path in others} == others  # ... the rest untouched, the unlearning run reused
    assert_same_results(out, baseline.out())


# ---- 3. a full disk or a read-only folder: one line, exit 2, nothing lost -----------------------------------------
@dataclass(frozen=True)
class DiskFault:
    """A failing file operation (`patch(monkeypatch)`) and the file the one-line error must name."""

    id: str
    patch: Callable[[pytest.MonkeyPatch], None]
    names: str
    strerror: str
    recompute: bool = False  # delete the unlearning cell's result first, so the fault meets that cell's write


def _failing(number: int) -> Callable[..., Any]:
    """A file operation failing as on a full disk or in a read-only folder, naming no file (as write() and fsync()
    fail)."""

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(number, os.strerror(number))

    return fail


def _fail_result_renames(monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up just as a cell's result.json is renamed into place; every other rename works."""
    real = os.replace

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        if Path(dst).name == "result.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src), None, str(dst))
        real(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


ENOSPC, EACCES = os.strerror(errno.ENOSPC), os.strerror(errno.EACCES)
FAULTS = [
    DiskFault("fsync-enospc", lambda m: m.setattr(os, "fsync", _failing(errno.ENOSPC)), "config.resolved.json", ENOSPC),
    DiskFault("replace-enospc", lambda m: m.setattr(os, "replace", _failing(errno.ENOSPC)), "config.resolved.json",
              ENOSPC),
    DiskFault("mkstemp-eacces", lambda m: m.setattr(tempfile, "mkstemp", _failing(errno.EACCES)),
              "config.resolved.json", EACCES),
    DiskFault("cell-result-enospc", _fail_result_renames, f"cells/{CELL}/result.json", ENOSPC, recompute=True),
]


@pytest.mark.parametrize("fault", FAULTS, ids=[fault.id for fault in FAULTS])
def test_a_failing_disk_is_one_line_and_loses_nothing(fault, prepared, baseline, tmp_path, monkeypatch, capsys):
    out = finished_copy(baseline.out(), tmp_path)
    if fault.recompute:
        (out / "cells" / CELL / "result.json").unlink()
    before = snapshot(out)
    with monkeypatch.context() as patched:
        fault.patch(patched)
        code = main(["run", str(prepared.grid), "--out", str(out), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.splitlines() == [f"error: {out / fault.names}: {fault.strerror}"]
    after = snapshot(out)
    json.loads(after.pop("config.resolved.json"))  # rewritten whole by every run (provenance), or kept
    before.pop("config.resolved.json")
    assert after == before and temporaries(out) == []


DROP_ROOT_OVERRIDE = ("setpriv", "--bounding-set=-dac_override,-dac_read_search",
                      "--inh-caps=-dac_override,-dac_read_search", "--")


def _permissions_enforced(prefix: tuple[str, ...], folder: Path) -> bool:
    """Whether a process started with `prefix` is refused a write into the read-only `folder`."""
    probe = subprocess.run([*prefix, "sh", "-c", f"touch '{folder}/probe'"], capture_output=True)
    (folder / "probe").unlink(missing_ok=True)
    return probe.returncode != 0


def test_a_read_only_output_folder_is_one_line(prepared, baseline, tmp_path):
    """A real read-only folder. As root (the tests' usual user here) the run goes through `setpriv` without the
    capability that lets root write anywhere; where that is not possible the test is skipped."""
    out = finished_copy(baseline.out(), tmp_path)
    before = snapshot(out)
    out.chmod(0o500)
    try:
        prefix = DROP_ROOT_OVERRIDE if os.geteuid() == 0 and shutil.which("setpriv") else ()
        if not _permissions_enforced(prefix, out):
            pytest.skip("file permissions are not enforced for this user (root without setpriv)")
        finished = subprocess.run([*prefix, str(SCRIPT), "run", str(prepared.grid), "--out", str(out), "--resume",
                                   "--no-progress"], env=_env(), capture_output=True, text=True, timeout=300)
    finally:
        out.chmod(0o700)
    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.splitlines() == [f"error: {out / 'config.resolved.json'}: {EACCES}"]
    assert snapshot(out) == before


# ---- 4. Ctrl-C ----------------------------------------------------------------------------------------------------
@pytest.mark.slow  # a grid killed and resumed in subprocesses: 1-3 min; .ci/run runs the slow tests too
def test_ctrl_c_exits_130_keeps_finished_cells_and_resume_completes(prepared, baseline, tmp_path):
    out = finished_copy(baseline.out(), tmp_path)
    shutil.rmtree(out / "cells" / CELL)
    for name in REPORT_FILES:
        (out / name).unlink()
    references = out / "cells" / "references" / "result.json"
    kept = references.stat().st_mtime_ns

    # a Ctrl-C right after the epoch-1 checkpoint, sent by the run itself: polling the file system for it missed
    # the moment on a loaded machine (the tiny run's later epochs took less time than a scheduling delay)
    interrupted = run_cli(prepared.grid, out, "--resume", crash_at="saved:unlearn/checkpoint", interrupt=True)
    assert interrupted.returncode == 130, interrupted.stderr
    assert interrupted.stderr.splitlines() == ["interrupted"]
    assert references.stat().st_mtime_ns == kept and not (out / "cells" / CELL / "result.json").exists()
    assert temporaries(out) == []

    resumed = run_cli(prepared.grid, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert references.stat().st_mtime_ns == kept
    assert_same_results(out, baseline.out())
    print(f"Ctrl-C after {interrupted.seconds:.1f} s, resume {resumed.seconds:.1f} s")


# ---- 5. MUSE's epoch selection after a resumed and after a reused unlearning run ---------------------------------
def _cell_result(out: Path) -> UnlearnCellResult:
    return UnlearnCellResult.model_validate_json((out / "cells" / CELL / "result.json").read_text())


REAL_KNOWMEM_HOOK = experiment.knowmem_hook


def _interrupting_in_epoch_2(corpus: Any, settings: Any) -> Callable:
    """The experiment's KnowMem hook, with a Ctrl-C in epoch 2 (after the epoch-1 checkpoint)."""
    hook = REAL_KNOWMEM_HOOK(corpus, settings)

    def interrupted(epoch: int, model: Any, tokenizer: Any) -> dict[str, float]:
        if epoch == 2:
            raise KeyboardInterrupt
        return hook(epoch, model, tokenizer)

    return interrupted


def test_epoch_selection_survives_resume_and_reuse(prepared, tmp_path, monkeypatch):
    straight, out = tmp_path / "straight", tmp_path / "out"
    run = ["run", str(prepared.select), "--no-progress"]
    assert main([*run, "--out", str(straight)]) == 0
    expected = _cell_result(straight).unlearn
    # the prepared target is barely trained (KnowMem-forget 0, as the retrain's): the rule keeps an early epoch's
    # folder, not the final model, so a selection skipped after resume or reuse shows in model_dir
    assert expected.selected_epoch is not None and expected.selected_epoch < expected.epochs_run, expected.epochs
    assert expected.model_dir == str(_unlearn_dir(straight) / "epochs" / f"epoch_{expected.selected_epoch:03d}")
    # once the cell is done only the evaluated epoch's model is kept (keep_epoch_models: false)
    assert [p.name for p in (_unlearn_dir(straight) / "epochs").iterdir()] == [Path(expected.model_dir).name]

    with monkeypatch.context() as patched:
        patched.setattr(experiment, "knowmem_hook", _interrupting_in_epoch_2)
        assert main([*run, "--out", str(out)]) == 130
    assert main([*run, "--out", str(out), "--resume"]) == 0
    finished = record(out)
    assert finished is not None and finished.progress.resumed_after == [1]
    resumed = _cell_result(out)
    assert resumed.unlearn.epochs == expected.epochs  # epoch 1's KnowMem came from the checkpoint
    assert resumed.unlearn.selected_epoch == expected.selected_epoch
    assert resumed.unlearn.model_dir == expected.model_dir.replace(str(straight), str(out))

    # reused: the cell's result is gone, its finished unlearning run is read back, not retrained
    (out / "cells" / CELL / "result.json").unlink()
    unlearn_files = mtimes(_unlearn_dir(out))
    assert main([*run, "--out", str(out), "--resume"]) == 0
    reused = _cell_result(out)
    assert mtimes(_unlearn_dir(out)) == unlearn_files
    assert reused.unlearn.selected_epoch == resumed.unlearn.selected_epoch
    assert reused.unlearn.model_dir == resumed.unlearn.model_dir
    assert reused.evals["fp"].metrics == resumed.evals["fp"].metrics


def test_unlearning_stops_at_the_selected_epoch(prepared, tmp_path):
    config = tmp_path / "stop.yaml"
    config.write_text(yaml.safe_dump(_config(prepared.root, precisions=["fp"], select_epoch=True)))
    assert main(["run", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    summary = _cell_result(tmp_path / "out").unlearn
    # the barely trained target meets MUSE's rule at epoch 1 of 3: nothing after it is trained
    assert summary.selected_epoch == 1 and summary.epochs_run == 1, summary.epochs
    assert summary.stopped_reason.startswith("selected: epoch 1"), summary.stopped_reason


def test_keep_epoch_models_keeps_every_epoch(prepared, tmp_path):
    config = tmp_path / "keep.yaml"
    config.write_text(yaml.safe_dump(_config(prepared.root, precisions=["fp"], select_epoch=True,
                                             stop_at_selected=False, keep_epoch_models=True)))
    assert main(["run", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    summary = _cell_result(tmp_path / "out").unlearn
    kept = sorted(p.name for p in (_unlearn_dir(tmp_path / "out") / "epochs").iterdir())
    assert summary.selected_epoch is not None and summary.epochs_run == 3
    assert kept == [f"epoch_{epoch:03d}" for epoch in (1, 2, 3)]
