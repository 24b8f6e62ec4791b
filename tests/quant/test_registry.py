import json

import pytest
import torch

from qrunlearn.errors import MissingDependencyError, UserError
from qrunlearn.quant import available_methods, load_quantized, quantize_model, quantized_codes, save_quantized
from qrunlearn.quant.registry import SPEC_FILE


def test_available_methods_lists_every_method():
    methods = available_methods()
    assert set(methods) == {"fp", "bf16", "rtn", "nf4", "fp4", "int8", "hqq", "gptq", "awq", "gguf"}
    assert methods["fp"] and methods["rtn"]


def test_fp_is_a_noop(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    assert quantize_model(tiny_model, "none") is tiny_model
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_gpt2_conv1d_layers_are_quantized():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=2, n_positions=32)).eval()
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        ref = model(ids).logits
    quantize_model(model, "rtn:w8g64")
    assert len(quantized_codes(model, "rtn:w8g64")) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj
    with torch.no_grad():
        got = model(ids).logits
    assert 0 < (got - ref).abs().max() < 0.05  # 8-bit: changed, but barely


@pytest.mark.parametrize("spec", ["rtn:w4g64", "nf4", "int8", "bf16", "fp"])
def test_save_then_load_gives_the_same_codes_and_logits(tiny_model_dir, tmp_path, spec):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "q"
    message = save_quantized(tiny_model_dir, spec, out, device="cpu")
    assert "lm_head stay full precision" in message or spec == "fp"
    saved = json.loads((out / SPEC_FILE).read_text())
    assert saved["spec"] == spec and len(saved["layers"]) == 14
    if spec in ("nf4", "int8"):
        assert "quantization_config" in json.loads((out / "config.json").read_text())
    loaded, tokenizer = load_quantized(out, None, device="cpu")
    direct, _ = load_quantized(tiny_model_dir, spec, device="cpu")
    batch = tokenizer(["Alice moved to"], return_tensors="pt")
    if spec != "fp":
        a, b = quantized_codes(loaded, spec), quantized_codes(direct, spec)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, direct(**batch).logits)


def test_load_with_a_different_spec_is_refused(tiny_model_dir, tmp_path):
    save_quantized(tiny_model_dir, "rtn:w4g64", tmp_path / "q", device="cpu")
    with pytest.raises(UserError, match="holds a rtn:w4g64 model, not rtn:w8"):
        load_quantized(tmp_path / "q", "rtn:w8", device="cpu")


def test_bad_group_writes_nothing(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="does not divide"):
        save_quantized(tiny_model_dir, "hqq:w4g128", tmp_path / "q", device="cpu")
    assert not (tmp_path / "q").exists()


def test_missing_gptq_backend_is_a_one_line_hint(tiny_model):
    if available_methods()["gptq"]:
        pytest.skip("llmcompressor is installed here")
    with pytest.raises(MissingDependencyError) as err:
        quantize_model(tiny_model, "gptq:w4g64")
    assert "llmcompressor" in str(err.value) and "qrunlearn[gptq]" in str(err.value) and "\n" not in str(err.value)
