"""`qrunlearn audit`: the interval-aware gate and its exit codes (0 / 1 / 2), on evaluations planted in the cache
(so each verdict is known exactly), and one real run on the tiny model whose second run reuses every evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from qrunlearn.audit import AuditConfig, Evaluator, gate
from qrunlearn.cli import main
from qrunlearn.data.muse import load_corpus
from qrunlearn.eval import EvalConfig
from qrunlearn.eval.effect import Estimate
from qrunlearn.eval.items import ItemScores
from qrunlearn.quant.spec import parse_spec
from qrunlearn.results import EvalRecord, Metrics

N = 40  # planted KnowMem-forget questions


def test_gate_reads_the_whole_interval():
    forgot = Estimate(value=50.0, low=40.0, high=60.0)
    assert gate(forgot, Estimate(value=0.02, low=0.0, high=0.08), 0.1, "fail") == ("keeps", True)
    assert gate(forgot, Estimate(value=0.3, low=0.2, high=0.4), 0.1, "fail") == ("reverts", False)
    assert gate(forgot, Estimate(value=0.05, low=0.0, high=0.15), 0.1, "fail") == ("inconclusive", False)
    assert gate(forgot, Estimate(value=0.05, low=0.0, high=0.15), 0.1, "pass") == ("inconclusive", True)
    # as forgotten as the retrain model at this format: passes whatever the share (a bounded metric's floor)
    floored = Estimate(value=-0.7, low=-2.1, high=0.0)
    assert gate(forgot, Estimate(value=0.3, low=0.2, high=0.4), 0.1, "fail", floored) == ("at retrain", True)
    assert gate(forgot, Estimate(value=0.3, low=0.2, high=0.4), 0.1, "fail", Estimate(value=0.7, low=-1.0, high=2.1)) \
        == ("reverts", False)
    assert gate(Estimate(value=2.0, low=-1.0, high=5.0), Estimate(value=0.0, low=0.0, high=0.0), 0.1, "pass") == (
        "no effect", False)


def _copy_model(source: Path, out: Path, scale: float) -> Path:
    """A copy of the model whose weights differ (so its content identity differs)."""
    shutil.copytree(source, out)
    weights = load_file(str(out / "model.safetensors"))
    save_file({k: v * scale for k, v in weights.items()}, str(out / "model.safetensors"))
    return out


def _record(knowmem_f: list[float]) -> EvalRecord:
    return EvalRecord(metrics=Metrics(knowmem_f=sum(knowmem_f) / len(knowmem_f), knowmem_r=80.0),
                      items=ItemScores(knowmem_f=knowmem_f))


@pytest.fixture(scope="module")
def planted(tiny_model_dir, tiny_corpus_dir, tmp_path_factory):
    """A target, and unlearned models that keep (0 of 40 answers back at nf4), revert (20 of 40) and are
    inconclusive (4 of 40, a reversion of 0.1 whose interval straddles 0.1), their evaluations in the cache."""
    root = tmp_path_factory.mktemp("planted")
    models = {name: _copy_model(tiny_model_dir, root / name, 1.0 + 0.01 * i)
              for i, name in enumerate(["keeps", "reverts", "straddles"], start=1)}
    settings = EvalConfig(metrics=("knowmem_f", "knowmem_r"), bootstrap=400)
    cache = root / "evals"
    evaluator = Evaluator(load_corpus(tiny_corpus_dir), tiny_corpus_dir, settings, cache, lambda _m: None)
    fp, nf4 = parse_spec("fp"), parse_spec("nf4")
    plant = {(str(tiny_model_dir), fp): [100.0] * N, (str(tiny_model_dir), nf4): [100.0] * N}
    for back, name in ((0, "keeps"), (20, "reverts"), (4, "straddles")):
        plant[str(models[name]), fp] = [0.0] * N
        plant[str(models[name]), nf4] = [100.0] * back + [0.0] * (N - back)
    for (model, spec), scores in plant.items():
        path = evaluator._path(model, spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_record(scores).model_dump_json())
    return models, cache, settings


def _audit(tiny_model_dir, tiny_corpus_dir, out: Path, cache: Path, unlearned: list[Path], *extra: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(cache, out / "evals", dirs_exist_ok=True)
    args = ["audit", "--target", str(tiny_model_dir), "--data", str(tiny_corpus_dir), "--out", str(out),
            "--formats", "fp,nf4", "--metrics", "knowmem_f,knowmem_r", "--bootstrap", "400", "--no-progress"]
    for model in unlearned:
        args += ["--unlearned", str(model)]
    return main(args + list(extra))


def test_exit_codes_follow_the_gate(planted, tiny_model_dir, tiny_corpus_dir, tmp_path, capsys):
    models, cache, _ = planted
    assert _audit(tiny_model_dir, tiny_corpus_dir, tmp_path / "a", cache, [models["keeps"]]) == 0
    result = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert result["passed"] and result["evaluations"] == 0  # every evaluation came from the cache
    row = next(r for r in result["rows"] if r["format"] == "nf4" and r["gate"])
    assert row["gate"] == "keeps" and row["effects"]["knowmem_f"]["reversion"]["value"] == 0.0
    assert _audit(tiny_model_dir, tiny_corpus_dir, tmp_path / "b", cache, [models["keeps"], models["reverts"]]) == 1
    out = capsys.readouterr().out
    assert "# Audit: FAIL" in out and "reverts at nf4: KnowMem-forget reversion 0.50" in out
    assert _audit(tiny_model_dir, tiny_corpus_dir, tmp_path / "c", cache, [models["straddles"]]) == 1
    assert _audit(tiny_model_dir, tiny_corpus_dir, tmp_path / "d", cache, [models["straddles"]],
                  "--inconclusive", "pass") == 0
    assert _audit(tiny_model_dir, tiny_corpus_dir, tmp_path / "e", cache, [models["straddles"]],
                  "--max-reversion", "0.5") == 0
    for name in ("audit.json", "audit.md", "audit.html"):
        assert (tmp_path / "b" / name).is_file()
    assert (tmp_path / "b" / "audit.html").read_text().count("data:image/png;base64,") == 2


def test_bad_input_is_one_line_and_writes_nothing(planted, tiny_model_dir, tiny_corpus_dir, tmp_path, capsys):
    models, cache, _ = planted
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] += 1
    (other / "config.json").write_text(json.dumps(config))
    from qrunlearn.models.tiny import train_tokenizer

    retokenised = tmp_path / "retokenised"  # same architecture and vocabulary size, another tokenizer
    shutil.copytree(tiny_model_dir, retokenised)
    size = len(json.loads((tiny_model_dir / "tokenizer.json").read_text())["model"]["vocab"])
    train_tokenizer([doc[::-1] for doc in load_corpus(tiny_corpus_dir).raw["retain2"]] * 3, size, retokenised)
    cases = [(["--unlearned", str(other)], "vocab_size"), (["--formats", "fp,rtn:w4g7"], "group size"),
             (["--unlearned", str(retokenised)], "its tokenizer differs from the target's"),
             (["--formats", "fp,gguf:q4_k_x"], "unknown llama.cpp type"), (["--formats", "fp,q9"], "--formats"),
             (["--max-reversion", "1.5"], "max_reversion")]
    from qrunlearn.quant import available_methods

    if not available_methods()["gptq"]:  # a backend that is not installed: one line naming its install command
        cases.append((["--formats", "fp,awq:w4g64"], "make gptq-venv"))
    for extra, name in cases:
        out = tmp_path / f"out{len(name)}"
        args = ["audit", "--target", str(tiny_model_dir), "--data", str(tiny_corpus_dir), "--out", str(out),
                "--unlearned", str(models["keeps"]), "--no-progress", *extra]
        assert main(args) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and name in err, err
        assert not out.exists() or not any(out.iterdir())


def test_a_real_audit_reuses_its_cached_evaluations(tiny_model_dir, tiny_corpus_dir, tmp_path, capsys):
    """The tiny random model against a copy scaled by 1.001: nothing was forgotten, so the gate fails with
    'no measurable forgetting' (exit 1); a second audit into the same folder evaluates nothing again."""
    unlearned = _copy_model(tiny_model_dir, tmp_path / "unlearned", 1.001)
    args = ["audit", "--target", str(tiny_model_dir), "--unlearned", str(unlearned), "--data", str(tiny_corpus_dir),
            "--out", str(tmp_path / "out"), "--formats", "fp,bf16", "--limit", "4", "--bootstrap", "50",
            "--batch-size", "8", "--relearn", "2", "--relearn-lr", "1e-3", "--no-progress"]
    assert main(args) == 1
    first = json.loads((tmp_path / "out" / "audit.json").read_text())
    # 4 at the formats, 2 on the probed questions (target and the model before relearning; after is not cached)
    assert first["evaluations"] == 6 and "no measurable KnowMem-forget forgetting" in first["failures"][0]
    probe = first["relearning"][0]
    assert probe["by_subject"] and probe["steps"] == 2 and probe["probed_questions"] > 0
    assert "## Relearning: 2 steps" in (tmp_path / "out" / "audit.md").read_text()
    assert main(args) == 1
    second = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert second["evaluations"] == 0 and second["cached"] == 6
    assert [r["metrics"] for r in second["rows"]] == [r["metrics"] for r in first["rows"]]
    assert AuditConfig.model_validate(second["config"]).formats[0].label == "fp"
