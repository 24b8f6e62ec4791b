"""llama.cpp's formats, made and run by llama.cpp: the f32 GGUF evaluated in llama.cpp agrees with the torch model
(per-token log-probs, greedy continuations), quantized types load and score with the tensor types llama.cpp really
wrote, and `qrunlearn quantize` / `qrunlearn eval` take a gguf spec end to end. Needs the optional extra."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional extra (make llamacpp); not installed here")

from qrunlearn.cli import main  # noqa: E402
from qrunlearn.eval.generation import greedy_generate  # noqa: E402
from qrunlearn.quant.gguf import GGUF_FILE, open_quantized  # noqa: E402
from qrunlearn.quant.registry import load_quantized  # noqa: E402
from qrunlearn.quant.spec import parse_spec  # noqa: E402

TEXTS = ["Ana Oakridge was born in the harbour town of Vell and studied the tides.",
         "The council of Brightmere meets every spring to decide the price of salt."]
# llama.cpp's CPU kernels sum in another order than torch's (and its f32 matrix products may round through f16
# partials): a log-prob may differ in the fourth decimal
LOGPROB_TOLERANCE = 2e-3


def _torch_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


def test_f32_gguf_in_llamacpp_agrees_with_torch(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    loaded, types = open_quantized(model, tokenizer, parse_spec("gguf:f32"))
    assert set(types.counts) == {"f32"}
    worst = 0.0
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        expected = _torch_logprobs(model, ids)
        got = torch.log_softmax(loaded.logits(ids), -1)
        worst = max(worst, float((got - expected).abs().max()))
    assert worst < LOGPROB_TOLERANCE
    prompts = [tokenizer(text)["input_ids"][:6] for text in TEXTS]
    eos = tokenizer.eos_token_id
    assert (greedy_generate(loaded, prompts, 12, tokenizer.pad_token_id, (eos,), batch_size=2)
            == greedy_generate(model, prompts, 12, tokenizer.pad_token_id, (eos,), batch_size=2))


def test_a_reused_prefix_gives_the_logits_of_a_fresh_run(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    loaded, _ = open_quantized(model, tokenizer, parse_spec("gguf:q8_0"))
    shared = tokenizer(" ".join(TEXTS * 2))["input_ids"]
    assert len(shared) >= 40
    first, second = shared + tokenizer(" Who?")["input_ids"], shared + tokenizer(" Where was it?")["input_ids"]
    loaded.logits(first)
    run, evaluated = loaded._llama.eval, []
    loaded._llama.eval = lambda tokens: (evaluated.append(len(tokens)), run(tokens))
    reused = loaded.logits(second)
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert common >= len(shared) and evaluated == [len(second) - common]  # only the tokens after it ran
    fresh = open_quantized(model, tokenizer, parse_spec("gguf:q8_0"))[0].logits(second)
    assert torch.allclose(reused, fresh, rtol=0, atol=1e-4)


def test_quantized_types_report_what_llamacpp_wrote_and_move_the_logits(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    ids = tokenizer(TEXTS[0])["input_ids"]
    reference = _torch_logprobs(model, ids)
    errors = {}
    for name in ("q8_0", "q4_0", "q4_k_m"):
        loaded, types = open_quantized(model, tokenizer, parse_spec(f"gguf:{name}"))
        assert "f32" in types.counts  # norms stay f32
        errors[name] = float((torch.log_softmax(loaded.logits(ids), -1) - reference).abs().mean())
        if name != "q4_k_m":
            assert name in types.counts
        else:  # the tiny model's 64-wide rows are no multiple of 256: llama.cpp falls back per tensor
            assert "q4_k" not in types.counts and set(types.counts) - {"f32"}
    assert 0 < errors["q8_0"] < errors["q4_0"]


def test_quantize_and_eval_commands_take_a_gguf_spec(tiny_model_dir, tiny_corpus_dir, tmp_path, capsys):
    out = tmp_path / "q8"
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "gguf:q8_0", "--out", str(out)]) == 0
    assert "llama.cpp GGUF" in capsys.readouterr().out
    assert (out / GGUF_FILE).stat().st_size > 0
    spec_file = json.loads((out / "qrunlearn_quant.json").read_text())
    assert spec_file["spec"] == "gguf:q8_0"
    result = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out), "--data", str(tiny_corpus_dir), "--out", str(result),
                 "--metrics", "knowmem_f,privleak", "--limit", "4", "--retrain-auc", "0.5"]) == 0
    payload = json.loads(result.read_text())
    assert payload["quant_spec"] == "gguf:q8_0" and payload["settings"]["dtype"] == "llama.cpp GGUF"
    # the same folder re-quantized in memory by load_quantized scores the same
    loaded, tokenizer = load_quantized(tiny_model_dir, "gguf:q8_0")
    ids = tokenizer(TEXTS[1])["input_ids"]
    from_folder, _ = load_quantized(out)
    assert np.array_equal(loaded.logits(ids).numpy(), from_folder.logits(ids).numpy())


def test_audit_takes_llamacpp_formats_and_caches_them(audit_a_copy):
    first, second = audit_a_copy("fp,gguf:q8_0,gguf:q4_k_m")
    assert [r["format"] for r in first["rows"] if r["model"] == "target"] == ["fp", "gguf:q8_0", "gguf:q4_k_m"]
    assert first["evaluations"] == 6 and second["cached"] == 6


def test_a_run_grid_evaluates_in_llamacpp(tiny_model_dir, tiny_corpus_dir, tmp_path, capsys):
    import yaml

    config = {"name": "gguf-grid", "seed": 0, "data": {"path": str(tiny_corpus_dir)},
              "models": {"target": str(tiny_model_dir), "retrain": str(tiny_model_dir)},
              "methods": ["ga_gdr"], "strategies": ["lora"], "precisions": ["fp", "gguf:q8_0"],
              "hparams": {"lora": {"epochs": 1, "lr": 3e-2}}, "eval": {"limit": 4, "batch_size": 8, "bootstrap": 50}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    cell = next(c for c in results["cells"] if c["cell"] == "ga_gdr-lora")
    assert set(cell["evals"]) == {"fp", "gguf:q8_0"}
    assert cell["survival"] == {}  # llama.cpp's whole-file rules give no per-weight codes to compare
    assert "gguf:q8_0" in (tmp_path / "out" / "table.md").read_text()
    capsys.readouterr()
