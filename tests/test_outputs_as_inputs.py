"""Every command that takes a model accepts the folder another qrunlearn command wrote: `unlearn --out` (model in
OUT/model, named by the folder's pointer), `quantize --out` (the folder itself) and a `run` cell folder (model in
cells/<id>/unlearn/model; here one written before pointers existed, read from that legacy location)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qrunlearn.cli import main
from qrunlearn.models.loading import load_causal_lm
from qrunlearn.models.source import MODEL_POINTER, resolve_model_path
from qrunlearn.quant import load_quantized

UNLEARN = ["--defaults", "tiny", "--epochs", "1", "--max-length", "64", "--lr", "1e-3", "--no-progress"]
EVAL = ["--metrics", "knowmem_f,privleak", "--limit", "2", "--bootstrap", "10"]


@pytest.fixture(scope="module")
def unlearn_out(tiny_model_dir, tiny_corpus_dir, tmp_path_factory):
    """A real `qrunlearn unlearn --out OUT` folder (one epoch of GA+GDR on the tiny model)."""
    out = tmp_path_factory.mktemp("unlearned")
    assert main(["unlearn", "--model", str(tiny_model_dir), "--data", str(tiny_corpus_dir), "--out", str(out),
                 *UNLEARN]) == 0
    assert (out / "model" / "config.json").is_file() and not (out / "config.json").exists()
    return out


def test_an_unlearn_out_folder_points_at_its_model(unlearn_out):
    assert json.loads((unlearn_out / MODEL_POINTER).read_text()) == {"model": "model"}
    assert resolve_model_path(unlearn_out) == unlearn_out / "model"


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_an_unlearn_out_folder_loads_as_its_model_and_differs_from_the_target(unlearn_out, tiny_model_dir):
    from_out, tokenizer = load_causal_lm(unlearn_out, device="cpu")
    from_model, _ = load_causal_lm(unlearn_out / "model", device="cpu")
    target, _ = load_causal_lm(tiny_model_dir, device="cpu", with_tokenizer=False)
    loaded, expected, before = _weights(from_out), _weights(from_model), _weights(target)
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in loaded)
    assert any(not torch.equal(loaded[k], before[k]) for k in loaded)  # it is the unlearned model, not the target
    assert tokenizer is not None


def test_quantize_then_eval_and_survival_take_the_written_folders(unlearn_out, tiny_model_dir, tiny_corpus_dir,
                                                                   tmp_path, capsys):
    quantized = tmp_path / "q"
    assert main(["quantize", "--model", str(unlearn_out), "--method", "rtn:w4g64", "--out", str(quantized),
                 "--device", "cpu"]) == 0
    assert json.loads((quantized / "qrunlearn_quant.json").read_text())["source"] == str(unlearn_out / "model")
    # eval of a quantize --out folder evaluates the quantized model, not the full-precision weights stored in it
    for model, name in ((quantized, "q.json"), (unlearn_out, "fp.json")):
        assert main(["eval", "--model", str(model), "--data", str(tiny_corpus_dir), "--out", str(tmp_path / name),
                     "--retrain", str(unlearn_out), *EVAL]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "q.json").read_text())["quant_spec"] == "rtn:w4g64"
    assert json.loads((tmp_path / "fp.json").read_text())["quant_spec"] is None
    report = tmp_path / "survival.json"
    assert main(["survival", "--base", str(tiny_model_dir), "--unlearned", str(unlearn_out), "--method",
                 "rtn:w4g64", "--out", str(report), "--device", "cpu"]) == 0
    assert json.loads(report.read_text())["layers"], "no per-layer survival rows"


def test_a_run_cell_folder_loads_as_its_unlearned_model(unlearn_out, tmp_path):
    cell = tmp_path / "cells" / "ga_gdr-full"
    shutil.copytree(unlearn_out, cell / "unlearn")
    (cell / "unlearn" / MODEL_POINTER).unlink()  # as an unlearn folder from before pointers
    model, _ = load_quantized(cell, "rtn:w4g64", device="cpu")
    reference, _ = load_quantized(unlearn_out / "model", "rtn:w4g64", device="cpu")
    loaded, expected = _weights(model), _weights(reference)
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in loaded)
    assert any(getattr(m, "is_qrunlearn_quantized", False) for m in model.modules())
