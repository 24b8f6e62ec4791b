"""GPTQ and AWQ through llmcompressor, executed: `qrunlearn quantize` writes a compressed-tensors folder whose block
linears hold packed 4-bit codes and scales with the spec's bits, group size and symmetry, the folder's logits stay
near the full-precision model's and it evaluates, AWQ's scale search gives other codes than GPTQ's, and the audit
takes both formats (calibrating on the corpus's retain documents). Runs in llmcompressor's own environment:
`make gptq-venv && make test-gptq`."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llmcompressor", reason="llmcompressor lives in its own environment (make gptq-venv)")

from qrunlearn.cli import main  # noqa: E402
from qrunlearn.models.loading import load_causal_lm  # noqa: E402
from qrunlearn.quant.registry import load_quantized  # noqa: E402

TEXT = "Ana Oakridge was born in the harbour town of Vell and studied the tides."


def _quantize(model_dir, corpus_dir, spec: str, out) -> None:
    assert main(["quantize", "--model", str(model_dir), "--method", spec, "--data", str(corpus_dir),
                 "--out", str(out), "--device", "cpu", "--calib-samples", "16"]) == 0


@pytest.mark.parametrize("spec", ["gptq:w4g32", "awq:w4g32"])
def test_quantize_writes_packed_codes_that_evaluate(tiny_model_dir, tiny_corpus_dir, tmp_path, capsys, spec):
    out = tmp_path / "q"
    _quantize(tiny_model_dir, tiny_corpus_dir, spec, out)
    assert "compressed-tensors" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, spec.startswith("gptq"))
    model, tokenizer = load_quantized(out)
    layer = model.model.layers[0].mlp.up_proj
    assert {name for name, _ in layer.named_parameters()} >= {"weight_packed", "weight_scale"}
    fp, _ = load_causal_lm(tiny_model_dir, device="cpu")
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        gap = (model(input_ids=ids).logits - fp(input_ids=ids).logits).abs().mean()
    assert 0 < float(gap) < 1.0
    result = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out), "--data", str(tiny_corpus_dir), "--out", str(result),
                 "--metrics", "knowmem_f", "--limit", "4"]) == 0
    assert json.loads(result.read_text())["knowmem_f"] is not None


def test_awq_and_gptq_codes_differ(tiny_model_dir, tiny_corpus_dir, tmp_path):
    _quantize(tiny_model_dir, tiny_corpus_dir, "gptq:w4g32", tmp_path / "gptq")
    _quantize(tiny_model_dir, tiny_corpus_dir, "awq:w4g32", tmp_path / "awq")
    gptq = load_quantized(tmp_path / "gptq")[0].model.layers[0].mlp.up_proj.weight_packed
    awq = load_quantized(tmp_path / "awq")[0].model.layers[0].mlp.up_proj.weight_packed
    assert gptq.shape == awq.shape and not torch.equal(gptq, awq)


def test_audit_takes_gptq_and_awq(audit_a_copy):
    first, second = audit_a_copy("fp,gptq:w4g32,awq:w4g32")
    assert [r["format"] for r in first["rows"] if r["model"] == "target"] == ["fp", "gptq:w4g32", "awq:w4g32"]
    assert first["evaluations"] == 6 and second["cached"] == 6
