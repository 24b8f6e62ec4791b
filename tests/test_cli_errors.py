"""Every CLI error is one line and exit code 2: bad invocations of every subcommand, run through the installed
`qrunlearn` console script in subprocesses (as a user runs it, so the entry point and its error handling are the
ones under test). Each must exit 2 with exactly one non-empty stderr line naming the option or file, no traceback.

The invocations run two at a time; all but one are answered before any model or torch import (the stages are
imported lazily and paths are checked while parsing), so the whole matrix takes seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import qrunlearn

SCRIPT = Path(sys.executable).with_name("qrunlearn")
SOURCE_ROOT = Path(qrunlearn.__file__).resolve().parents[1]  # the checkout under test, whatever the venv points at


@dataclass(frozen=True)
class BadCall:
    """A bad invocation; `{corpus}`, `{notmodel}`, ... in `args` are fixture paths; `names` must be in the error."""

    id: str
    args: tuple[str, ...]
    names: str


CASES = [
    # data check / synth / fetch
    BadCall("data-check-missing-folder", ("data", "check", "{tmp}/absent"), "{tmp}/absent"),
    BadCall("data-check-malformed-json", ("data", "check", "{badjson}"), "{badjson}/raw/forget.json"),
    BadCall("data-check-tokenizer-not-a-model", ("data", "check", "{corpus}", "--tokenizer", "{notmodel}"),
            "{notmodel}"),
    BadCall("data-synth-unknown-size", ("data", "synth", "--out", "{tmp}/s", "--size", "huge"), "--size"),
    BadCall("data-synth-bad-seed", ("data", "synth", "--out", "{tmp}/s", "--seed", "abc"), "--seed"),
    BadCall("data-synth-missing-out", ("data", "synth"), "--out"),
    BadCall("data-fetch-missing-dataset", ("data", "fetch"), "dataset"),
    BadCall("data-fetch-missing-out", ("data", "fetch", "muse-bench/MUSE-News"), "--out"),
    # target
    BadCall("target-missing-data", ("target", "--data", "{tmp}/absent", "--out", "{tmp}/t"), "--data"),
    BadCall("target-unknown-size", ("target", "--data", "{corpus}", "--out", "{tmp}/t", "--size", "huge"), "--size"),
    BadCall("target-zero-epochs", ("target", "--data", "{corpus}", "--out", "{tmp}/t", "--epochs", "0"), "--epochs"),
    # eval
    BadCall("eval-missing-model-option", ("eval", "--data", "{corpus}", "--out", "{tmp}/r.json"), "--model"),
    BadCall("eval-folder-not-a-model", ("eval", "--model", "{notmodel}", "--data", "{corpus}", "--out",
                                        "{tmp}/r.json"), "{notmodel}"),
    BadCall("eval-config-not-json", ("eval", "--model", "{badconfig}", "--data", "{corpus}", "--out",
                                     "{tmp}/r.json"), "{badconfig}/config.json"),
    BadCall("eval-missing-model-folder", ("eval", "--model", "{tmp}/absent/model", "--data", "{corpus}", "--out",
                                          "{tmp}/r.json"), "{tmp}/absent/model"),
    BadCall("eval-missing-data", ("eval", "--model", "{notmodel}", "--data", "{tmp}/absent", "--out",
                                  "{tmp}/r.json"), "--data"),
    BadCall("eval-zero-batch-size", ("eval", "--model", "{notmodel}", "--data", "{corpus}", "--out", "{tmp}/r.json",
                                     "--batch-size", "0"), "--batch-size"),
    BadCall("eval-unknown-metric", ("eval", "--model", "{notmodel}", "--data", "{corpus}", "--out", "{tmp}/r.json",
                                    "--metrics", "verbmem_f,bogus"), "--metrics"),
    BadCall("eval-unknown-dtype", ("eval", "--model", "{notmodel}", "--data", "{corpus}", "--out", "{tmp}/r.json",
                                   "--dtype", "float64"), "--dtype"),
    # unlearn
    BadCall("unlearn-unknown-method", ("unlearn", "{unlearn}", "--method", "nosuch"), "--method"),
    BadCall("unlearn-unknown-reg", ("unlearn", "{unlearn}", "--reg", "klx"), "--reg"),
    BadCall("unlearn-unknown-strategy", ("unlearn", "{unlearn}", "--strategy", "qlora"),
            "--strategy: strategy 'qlora'"),
    BadCall("unlearn-strategy-bad-spec", ("unlearn", "{unlearn}", "--strategy", "qat:int8"),
            "--strategy: strategy 'qat:int8': qat.spec"),
    BadCall("unlearn-lr-not-a-number", ("unlearn", "{unlearn}", "--lr", "abc"), "--lr"),
    BadCall("unlearn-negative-lr", ("unlearn", "{unlearn}", "--lr", "-1"), "--lr"),
    BadCall("unlearn-zero-batch-size", ("unlearn", "{unlearn}", "--batch-size", "0"), "--batch-size"),
    BadCall("unlearn-folder-not-a-model", ("unlearn", "{unlearn}"), "{notmodel}"),
    BadCall("unlearn-missing-data", ("unlearn", "--model", "{notmodel}", "--data", "{tmp}/absent", "--out",
                                     "{tmp}/u"), "--data"),
    # quantize
    BadCall("quantize-unknown-spec", ("quantize", "--model", "{notmodel}", "--method", "q9", "--out", "{tmp}/q"),
            "--method"),
    BadCall("quantize-unsupported-bits", ("quantize", "--model", "{notmodel}", "--method", "hqq:w5g64", "--out",
                                          "{tmp}/q"), "--method"),
    BadCall("quantize-folder-not-a-model", ("quantize", "--model", "{notmodel}", "--method", "rtn:w4g64", "--out",
                                            "{tmp}/q"), "{notmodel}"),
    BadCall("quantize-missing-method", ("quantize", "--model", "{notmodel}", "--out", "{tmp}/q"), "--method"),
    # survival
    BadCall("survival-unknown-spec", ("survival", "--base", "{notmodel}", "--unlearned", "{notmodel}", "--method",
                                      "q9"), "--method"),
    BadCall("survival-missing-base", ("survival", "--base", "{tmp}/absent/base", "--unlearned", "{notmodel}",
                                      "--method", "nf4"), "{tmp}/absent/base"),
    BadCall("survival-missing-unlearned-option", ("survival", "--base", "{notmodel}", "--method", "nf4"),
            "--unlearned"),
    # run
    BadCall("run-malformed-yaml", ("run", "{badyaml}", "--list-cells"), "{badyaml}"),
    BadCall("run-unknown-key", ("run", "{unknownkey}", "--list-cells"), "{unknownkey}"),
    BadCall("run-unknown-precision", ("run", "{badprecision}", "--list-cells"),
            "{badprecision}: field 'precisions.1': unknown quantization spec 'q9'"),
    BadCall("run-bad-strategy-spec", ("run", "{badstrategy}", "--list-cells"),
            "{badstrategy}: field 'strategies.1.qat.spec': quantization-aware unlearning supports"),
    BadCall("run-repeated-precision", ("run", "{repeated}", "--list-cells"), "listed twice: nf4"),
    BadCall("run-missing-config", ("run", "{tmp}/absent.yaml"), "{tmp}/absent.yaml"),
    BadCall("run-unknown-method", ("run", "{badmethod}", "--list-cells"), "unknown method 'dpo_gdr'"),
    BadCall("run-act-without-rmu", ("run", "{actmethod}", "--list-cells"), "the act retain term is RMU's"),
    BadCall("unlearn-act-without-rmu", ("unlearn", "{unlearn}", "--method", "npo", "--reg", "act"),
            "reg 'act' is RMU's retain term"),
    BadCall("run-empty-seeds", ("run", "{emptyseeds}", "--list-cells"), "field 'seeds'"),
    BadCall("run-seeds-not-integers", ("run", "{floatseeds}", "--list-cells"), "field 'seeds"),
    BadCall("run-threshold-outside-0-1", ("run", "{badthreshold}", "--list-cells"), "field 'reversion_threshold'"),
    BadCall("run-cell-not-a-number", ("run", "--cell", "abc"), "--cell"),
    # audit
    BadCall("audit-target-not-a-model", ("audit", "--target", "{notmodel}", "--unlearned", "{notmodel}", "--data",
                                         "{corpus}", "--out", "{tmp}/audit"), "--target"),
    # report
    BadCall("report-missing-folder", ("report", "{tmp}/absent"), "{tmp}/absent"),
    BadCall("report-not-an-experiment", ("report", "{tmp}"), "{tmp}"),
    BadCall("report-malformed-yaml", ("report", "{tmp}", "--config", "{badyaml}"), "{badyaml}"),
    BadCall("report-bad-recorded-config", ("report", "{badrun}"), "{badrun}/config.resolved.json: the run's config, "
                                                                  "field 'hparams.full': 'qat' is a strategy's"),
]


def _bad_inputs(root: Path, corpus: Path) -> dict[str, str]:
    """The files the bad calls point at, written under `root`."""
    (root / "badjson" / "raw").mkdir(parents=True)
    (root / "badjson" / "raw" / "forget.json").write_text('["a document",')
    (root / "notmodel").mkdir()
    (root / "notmodel" / "notes.txt").write_text("not a model")
    (root / "badconfig").mkdir()
    (root / "badconfig" / "config.json").write_text("[1, 2]")
    (root / "bad.yaml").write_text("methods: [ga_gdr\n")
    (root / "unknown_key.yaml").write_text(json.dumps({"methodz": ["ga_gdr"]}))
    (root / "bad_precision.yaml").write_text(json.dumps({"precisions": ["fp", "q9"]}))
    (root / "bad_strategy.yaml").write_text(json.dumps({"strategies": ["full", "qat:int8"]}))
    (root / "repeated.yaml").write_text(json.dumps({"precisions": ["fp", "nf4", "NF4"]}))
    (root / "empty_seeds.yaml").write_text(json.dumps({"seeds": []}))
    (root / "float_seeds.yaml").write_text(json.dumps({"seeds": [0, 1.5]}))
    (root / "bad_threshold.yaml").write_text(json.dumps({"reversion_threshold": 1.5}))
    (root / "bad_method.yaml").write_text(json.dumps({"methods": ["npo_gdr", "dpo_gdr"]}))
    (root / "act_method.yaml").write_text(json.dumps({"methods": ["npo_act"]}))
    (root / "badrun").mkdir()  # a run folder whose recorded config (the report's default) is not a valid one
    (root / "badrun" / "config.resolved.json").write_text(json.dumps({"config": {"hparams": {"full": {"qat": "nf4"}}}}))
    paths = {"tmp": root, "corpus": corpus, "emptyseeds": root / "empty_seeds.yaml",
             "floatseeds": root / "float_seeds.yaml", "badthreshold": root / "bad_threshold.yaml",
             "badjson": root / "badjson", "notmodel": root / "notmodel",
             "badconfig": root / "badconfig", "badyaml": root / "bad.yaml", "unknownkey": root / "unknown_key.yaml",
             "badprecision": root / "bad_precision.yaml", "badstrategy": root / "bad_strategy.yaml",
             "repeated": root / "repeated.yaml", "badmethod": root / "bad_method.yaml",
             "actmethod": root / "act_method.yaml", "badrun": root / "badrun"}
    return {name: str(path) for name, path in paths.items()}


def _expand(text: str, paths: dict[str, str]) -> list[str]:
    if text == "{unlearn}":  # the options every unlearn call needs, with a folder that is not a model
        return ["--model", paths["notmodel"], "--data", paths["corpus"], "--out", f"{paths['tmp']}/u"]
    return [text.format(**paths)]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


@dataclass(frozen=True)
class Outcome:
    argv: list[str]
    expected_name: str
    result: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_corpus_dir) -> dict[str, Outcome]:
    """Every case of CASES run through the console script, two at a time."""
    assert SCRIPT.is_file(), f"{SCRIPT}: the qrunlearn console script is not installed in this environment"
    root = tmp_path_factory.mktemp("cli_errors")
    paths = _bad_inputs(root, tiny_corpus_dir)
    argvs = {case.id: [part for arg in case.args for part in _expand(arg, paths)] for case in CASES}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case.id: pool.submit(_run, argvs[case.id], root) for case in CASES}
        return {case.id: Outcome(argvs[case.id], case.names.format(**paths), futures[case.id].result())
                for case in CASES}


def test_the_matrix_covers_every_subcommand():
    commands = {" ".join(case.args[:2]) if case.args[0] == "data" else case.args[0] for case in CASES}
    assert commands == {"data check", "data synth", "data fetch", "target", "eval", "unlearn", "quantize",
                        "survival", "run", "report", "audit"}
    assert len(CASES) >= 20 and len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_one_line_and_exit_2(case, outcomes):
    outcome = outcomes[case.id]
    result = outcome.result
    shown = f"qrunlearn {' '.join(outcome.argv)}\nexit {result.returncode}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout, shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, shown
    assert len(lines) == 1, shown
    assert lines[0].startswith("error: ") and outcome.expected_name in lines[0], shown
