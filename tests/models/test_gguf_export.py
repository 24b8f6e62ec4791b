"""GGUF export: an exported f32 file, re-imported with `qrunlearn models import` (transformers' own GGUF reader, which
undoes llama.cpp's rotary row order independently of our exporter), gives back the same logits; untied heads,
grouped-query attention and f16 are covered; models llama.cpp's llama graph cannot run fail with one line."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import LlamaConfig, LlamaForCausalLM

from qrunlearn.cli import main
from qrunlearn.errors import UserError
from qrunlearn.models.gguf import unpermute_rotary_rows
from qrunlearn.models.gguf_export import check_exportable, export_gguf, rotary_permute
from qrunlearn.models.loading import load_causal_lm, load_tokenizer


def _llama(tokenizer, tied: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # weights far from their initial symmetric values, so a wrong row order shows
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("tied", [True, False])
def test_f32_export_reimports_to_the_same_logits(tiny_model_dir, tmp_path, capsys, tied):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = _llama(tokenizer, tied)
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf")
    assert main(["models", "import", str(path), "--out", str(tmp_path / "back")]) == 0
    capsys.readouterr()
    back, back_tokenizer = load_causal_lm(tmp_path / "back", device="cpu")
    ids = torch.tensor([tokenizer("Ana Oakridge was born in the harbour town of")["input_ids"]])
    vocab = len(tokenizer)
    # transformers' GGUF tokenizer reader adds '<|endoftext|>' as the unknown token when a GPT-2-style vocabulary
    # has none (this one has none) and grows the embeddings by that row: the written vocabulary must come back whole
    assert back_tokenizer.get_vocab().items() >= tokenizer.get_vocab().items()
    assert torch.allclose(_logits(back, ids)[..., :vocab], _logits(model, ids), rtol=0, atol=1e-5)
    names = {tensor.name for tensor in GGUFReader(str(path)).tensors}
    assert ("output.weight" in names) is not tied  # a tied head is llama.cpp's token_embd reused
    assert not list(tmp_path.glob(".*.partial"))


def test_f16_export_keeps_norms_in_f32(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = _llama(tokenizer, tied=True)
    reader = GGUFReader(str(export_gguf(model, tokenizer, tmp_path / "model.gguf", dtype="f16")))
    types = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    written = {tensor.name: np.asarray(tensor.data) for tensor in reader.tensors}
    up = model.state_dict()["model.layers.1.mlp.up_proj.weight"].numpy()
    assert np.array_equal(written["blk.1.ffn_up.weight"], up.astype(np.float16))


def test_rotary_permute_is_undone_by_the_import_side(tmp_path):
    rows = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)
    permuted = rotary_permute(rows, n_head=3)
    assert not np.array_equal(permuted, rows)
    assert np.array_equal(unpermute_rotary_rows(permuted, n_head=3), rows)


def test_models_llamacpp_cannot_run_fail_with_one_line(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = _llama(tokenizer, tied=True)
    model.config.architectures = ["Qwen2ForCausalLM"]
    with pytest.raises(UserError, match="GGUF export supports LlamaForCausalLM"):
        check_exportable(model)
    biased = SimpleNamespace(config=SimpleNamespace(architectures=["LlamaForCausalLM"], attention_bias=True))
    with pytest.raises(UserError, match="linear biases"):
        check_exportable(biased)
