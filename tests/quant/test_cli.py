import json

import pytest

from qrunlearn.cli import main


def test_quantize_and_survival_commands(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "nf4"
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "nf4", "--out", str(out),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "14 linear layers" in printed and "lm_head stay full precision" in printed
    assert (out / "model.safetensors").exists()
    report = tmp_path / "report.json"
    assert main(["survival", "--base", str(tiny_model_dir), "--unlearned", str(tiny_model_dir),
                 "--method", "rtn:w4g64", "--out", str(report), "--device", "cpu"]) == 0
    data = json.loads(report.read_text())
    assert data["spec"] == "rtn:w4g64" and "identical" in data["verdict"] and data["metadata"]["versions"]
    assert (tmp_path / "report.png").exists()


def test_bad_input_exits_2_with_one_line(tiny_model_dir, tmp_path, capsys):
    for argv, fragment in [
        (["quantize", "--model", str(tiny_model_dir), "--method", "marlin:w4", "--out", str(tmp_path / "a")],
         "unknown quantization spec 'marlin:w4'"),
        (["quantize", "--model", str(tiny_model_dir), "--method", "rtn:w12", "--out", str(tmp_path / "b")],
         "12 bits not supported"),
        (["quantize", "--model", str(tiny_model_dir), "--method", "rtn:w4g128", "--out", str(tmp_path / "c"),
          "--device", "cpu"], "group size 128 does not divide"),
        (["survival", "--base", str(tmp_path / "missing"), "--unlearned", str(tiny_model_dir), "--method", "nf4"],
         "model folder not found"),
        (["quantize", "--model", str(tiny_model_dir), "--method", "gguf:q4_k_x", "--out", str(tmp_path / "d")],
         "unknown llama.cpp type 'q4_k_x'"),
        (["survival", "--base", str(tiny_model_dir), "--unlearned", str(tiny_model_dir), "--method", "gguf:q4_k_m"],
         "llama.cpp quantizes whole files"),
    ]:
        assert main(argv) == 2
        # the last stderr line (transformers may draw a weight-loading progress bar before it)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and fragment in err
    assert not any(tmp_path.iterdir())


def test_missing_backend_exits_2(tiny_model_dir, tmp_path, capsys):
    from qrunlearn.quant import available_methods

    if available_methods()["gptq"]:
        pytest.skip("llmcompressor is installed here")
    argv = ["quantize", "--model", str(tiny_model_dir), "--method", "gptq:w4g64", "--out", str(tmp_path / "g")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("error: GPTQ (in its own environment: make gptq-venv) needs the optional package "
                   "'llmcompressor': pip install 'qrunlearn[gptq]'")


def test_missing_llamacpp_names_its_make_target(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    argv = ["quantize", "--model", str(tiny_model_dir), "--method", "gguf:q4_k_m", "--out", str(tmp_path / "g")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("error: gguf:q4_k_m needs the optional package 'llama-cpp-python': make llamacpp (builds "
                   "llama-cpp-python from source: ~30 min on 2 cores)")
    assert not (tmp_path / "g").exists()
