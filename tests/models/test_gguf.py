"""GGUF import: a tiny Llama GGUF written here with the gguf package (Q4_1 block linears with llama.cpp's q/k row
permutation, a Q8_0 embedding, F32 norms, a byte-level BPE tokenizer) must come back as the weights written, the
Q4_1 grid must be found under every weight, and bad files must fail with one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import dequantize, quantize
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from qrunlearn.cli import main
from qrunlearn.errors import UserError
from qrunlearn.models.gguf import (
    GRID_TOLERANCE,
    IMPORT_RECORD,
    import_gguf,
    is_gguf,
    open_gguf,
    q4_1_block_grids,
    q4_1_grid_share,
    read_import_record,
)
from qrunlearn.models.loading import ModelSource, load_causal_lm
from qrunlearn.quant import rtn
from qrunlearn.quant.spec import parse_spec

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "a n", "e r"]
BLOCK_LINEARS = {  # transformers name -> (GGUF name, [out, in])
    "self_attn.q_proj": ("attn_q", (HEADS * HEAD_DIM, HIDDEN)),
    "self_attn.k_proj": ("attn_k", (KV_HEADS * HEAD_DIM, HIDDEN)),
    "self_attn.v_proj": ("attn_v", (KV_HEADS * HEAD_DIM, HIDDEN)),
    "self_attn.o_proj": ("attn_output", (HIDDEN, HEADS * HEAD_DIM)),
    "mlp.gate_proj": ("ffn_gate", (FFN, HIDDEN)),
    "mlp.up_proj": ("ffn_up", (FFN, HIDDEN)),
    "mlp.down_proj": ("ffn_down", (HIDDEN, FFN)),
}
REAL_GGUF = Path(__file__).resolve().parents[2] / "models" / ".gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- a tiny Llama GGUF ------------------------------------------------------------------------------------------
def _vocabulary() -> tuple[list[str], list[int]]:
    """Special tokens (CONTROL), the 256 byte-level symbols, then one token per merge (NORMAL)."""
    tokens = SPECIAL_TOKENS + sorted(set(bytes_to_unicode().values())) + [m.replace(" ", "") for m in MERGES]
    types = [TokenType.CONTROL] * len(SPECIAL_TOKENS) + [TokenType.NORMAL] * (len(tokens) - len(SPECIAL_TOKENS))
    return tokens, [int(t) for t in types]


def _llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: interleave the rotary halves of each head's rows."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _roundtrip(weight: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    return dequantize(quantize(weight, qtype), qtype)


def _random_llama(vocab_size: int) -> dict[str, np.ndarray]:
    """transformers-named fp32 weights, with per-row offsets so that blocks differ in d and m."""
    rng = np.random.default_rng(0)
    weights = {"model.embed_tokens.weight": rng.normal(0, 0.02, (vocab_size, HIDDEN)),
               "model.norm.weight": 1 + rng.normal(0, 0.1, HIDDEN)}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        weights[prefix + "input_layernorm.weight"] = 1 + rng.normal(0, 0.1, HIDDEN)
        weights[prefix + "post_attention_layernorm.weight"] = 1 + rng.normal(0, 0.1, HIDDEN)
        for name, (_, shape) in BLOCK_LINEARS.items():
            scale = rng.uniform(0.02, 0.2, (shape[0], 1))  # rows differ: a wrong row order breaks the grid
            weights[prefix + name + ".weight"] = rng.normal(0, 1, shape) * scale + rng.normal(0, 0.05, (shape[0], 1))
    return {name: value.astype(np.float32) for name, value in weights.items()}


def _write_header(writer: GGUFWriter, tokens: list[str], types: list[int]) -> None:
    writer.add_name("tiny-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)


def write_tiny_llama_gguf(path: Path) -> dict[str, np.ndarray]:
    """Write the GGUF and return what a correct import must hold: each weight after its own type's round trip,
    in transformers' row order (Q4_1 is row-local, so permuting rows commutes with quantizing them)."""
    tokens, types = _vocabulary()
    weights = _random_llama(len(tokens))
    expected = dict(weights)
    writer = GGUFWriter(str(path), "llama")
    _write_header(writer, tokens, types)
    embedding = weights["model.embed_tokens.weight"]
    writer.add_tensor("token_embd.weight", quantize(embedding, GGMLQuantizationType.Q8_0),
                      raw_dtype=GGMLQuantizationType.Q8_0)
    expected["model.embed_tokens.weight"] = _roundtrip(embedding, GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", weights[prefix + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight", weights[prefix + "post_attention_layernorm.weight"])
        for name, (gguf_name, _) in BLOCK_LINEARS.items():
            weight = weights[prefix + name + ".weight"]
            stored = {"attn_q": _llama_cpp_permute(weight, HEADS),
                      "attn_k": _llama_cpp_permute(weight, KV_HEADS)}.get(gguf_name, weight)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", quantize(stored, GGMLQuantizationType.Q4_1),
                              raw_dtype=GGMLQuantizationType.Q4_1)
            expected[prefix + name + ".weight"] = _roundtrip(weight, GGMLQuantizationType.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _reference_model(expected: dict[str, np.ndarray]) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=expected["model.embed_tokens.weight"].shape[0], hidden_size=HIDDEN,
                         intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5, rope_theta=10000.0,
                         max_position_embeddings=128, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    state = {name: torch.from_numpy(value) for name, value in expected.items()}
    model.load_state_dict(state, strict=False)  # lm_head is tied to the embedding
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_1.gguf"
    return path, write_tiny_llama_gguf(path)


@pytest.fixture(scope="module")
def imported(tiny_gguf, tmp_path_factory) -> Path:
    return import_gguf(tiny_gguf[0], tmp_path_factory.mktemp("imported") / "model")


# ---- import -----------------------------------------------------------------------------------------------------
def test_is_gguf_reads_magic_bytes_not_the_suffix(tiny_gguf, tmp_path):
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(tiny_gguf[0].read_bytes())
    text = tmp_path / "notes.gguf"
    text.write_text("GGU is not GGUF\n")
    assert is_gguf(tiny_gguf[0]) and is_gguf(renamed)
    assert not is_gguf(text) and not is_gguf(tmp_path / "absent.gguf") and not is_gguf(tmp_path)


def test_import_holds_the_weights_written(tiny_gguf, imported):
    _, expected = tiny_gguf
    model, _ = load_causal_lm(imported, device="cpu", with_tokenizer=False)
    state = model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(state[name], torch.from_numpy(value), rtol=0, atol=0, msg=name)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # tied, as the file implies
    # the Q4_1 round trip really moved the weights (the comparison above is not trivially fp32 == fp32)
    assert not np.array_equal(expected["model.layers.0.self_attn.q_proj.weight"],
                              _random_llama(len(_vocabulary()[0]))["model.layers.0.self_attn.q_proj.weight"])


def test_imported_logits_match_a_model_built_from_the_written_weights(tiny_gguf, imported):
    model, tokenizer = load_causal_lm(imported, device="cpu")
    reference = _reference_model(tiny_gguf[1])
    ids = tokenizer(["the cat in the hat", "an answer"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = model(**ids).logits
        want = reference(**ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.abs().max() > 0.01  # a real forward pass, not zeros


def test_tokenizer_comes_from_the_gguf_metadata(imported):
    _, tokenizer = load_causal_lm(imported, device="cpu")
    tokens, _ = _vocabulary()
    ids = tokenizer("the then", add_special_tokens=False)["input_ids"]
    assert [tokens[i] for i in ids] == ["t", "he", "Ġthe", "n"]  # the merges, including the two-step "Ġt he"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == 2
    assert tokenizer("<|im_start|>", add_special_tokens=False)["input_ids"] == [1]  # a control token stays whole


def test_import_record(tiny_gguf, imported):
    record = read_import_record(imported)
    path, expected = tiny_gguf
    assert record.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record.architecture == "llama" and record.jitter == 0.0
    assert record.parameters == sum(value.size for value in expected.values())
    assert record.tensor_types == {"Q8_0": 1, "F32": 1 + 2 * LAYERS, "Q4_1": 7 * LAYERS}
    assert record.on_grid_share_loaded == 1.0 and record.on_grid_share == 1.0
    assert json.loads((imported / IMPORT_RECORD).read_text())["source"] == str(path.resolve())
    assert json.loads((imported / "config.json").read_text())["dtype"] == "float32"


def test_load_causal_lm_takes_the_gguf_file_itself(tiny_gguf, imported):
    ModelSource(str(tiny_gguf[0])).check()
    direct, tokenizer = load_causal_lm(tiny_gguf[0], device="cpu")
    folder, _ = load_causal_lm(imported, device="cpu")
    ids = tokenizer(["the hat"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(direct(**ids).logits, folder(**ids).logits, rtol=0, atol=0)
    assert tokenizer.padding_side == "left" and not direct.training


# ---- the Q4_1 grid ----------------------------------------------------------------------------------------------
def test_grid_share_is_one_after_import_and_counts_moved_weights(tiny_gguf, imported):
    model, _ = load_causal_lm(imported, device="cpu", with_tokenizer=False)
    share = q4_1_grid_share(model, tiny_gguf[0])
    assert share.share == 1.0 and len(share.layers) == 7 * LAYERS
    assert share.numel == sum(out * inp for _, (out, inp) in BLOCK_LINEARS.values()) * LAYERS
    # move 100 weights of one q projection by a third of their block's step: exactly those leave the grid
    grid = next(g for g in q4_1_block_grids(open_gguf(tiny_gguf[0]), model) if g.module.endswith("0.self_attn.q_proj"))
    weight = model.get_submodule(grid.module).weight
    with torch.no_grad():
        flat_steps = grid.scale.repeat_interleave(32, dim=1).reshape(-1)
        weight.view(-1)[:100] += (flat_steps[:100] / 3).float()
    moved = q4_1_grid_share(model, tiny_gguf[0])
    layer = next(item for item in moved.layers if item.name == grid.module)
    assert layer.numel - layer.on_grid == 100 and moved.numel - moved.on_grid == 100


def test_grid_share_of_a_quantized_model_is_a_one_line_error(tiny_gguf, imported):
    model, _ = load_causal_lm(imported, device="cpu", with_tokenizer=False)
    quantized = rtn.quantize_model(model, parse_spec("rtn:w4"))  # RTNLinear keeps a dequantized `weight` buffer
    with pytest.raises(UserError, match=r"layers\.0\.self_attn\.q_proj: a RTNLinear, not a full-precision linear"):
        q4_1_grid_share(quantized, tiny_gguf[0])


def test_jitter_moves_weights_inside_their_bins_off_the_grid(tiny_gguf, imported, tmp_path):
    path = tiny_gguf[0]
    jittered = import_gguf(path, tmp_path / "jittered", jitter=1.0, seed=3)
    base, _ = load_causal_lm(imported, device="cpu", with_tokenizer=False)
    moved, _ = load_causal_lm(jittered, device="cpu", with_tokenizer=False)
    share = q4_1_grid_share(moved, path)
    assert share.share < 10 * GRID_TOLERANCE  # expected 2 * tolerance: the chance of landing within it
    assert read_import_record(jittered).on_grid_share == pytest.approx(share.share)
    for grid in q4_1_block_grids(open_gguf(path), base):
        before, after = (m.get_submodule(grid.module).weight.double() for m in (base, moved))
        half_step = grid.scale.repeat_interleave(32, dim=1) / 2
        assert ((after - before).abs() <= half_step * (1 + 1e-5)).all()  # inside the bin
        assert (after - before).abs().mean() > 0.4 * half_step.mean()  # and spread over it (uniform: 0.5)
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(base.state_dict()[norm], moved.state_dict()[norm])  # only block linears move
    again = import_gguf(path, tmp_path / "again", jitter=1.0, seed=3)
    other = import_gguf(path, tmp_path / "other", jitter=1.0, seed=4)
    weight = "model.layers.1.mlp.down_proj.weight"
    states = [load_causal_lm(p, device="cpu", with_tokenizer=False)[0].state_dict()[weight]
              for p in (jittered, again, other)]
    assert torch.equal(states[0], states[1]) and not torch.equal(states[0], states[2])


# ---- errors and the command line --------------------------------------------------------------------------------
def test_cli_import_of_a_text_file_named_gguf_is_one_line(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model\n")
    assert main(["models", "import", str(fake), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not a GGUF file" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="not a GGUF file"):
        load_causal_lm(fake)


def test_corrupt_and_unsupported_files_fail_with_one_line(tiny_gguf, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf[0].read_bytes()[:2000])
    with pytest.raises(UserError, match="corrupt GGUF file"):
        import_gguf(truncated, tmp_path / "a")
    unsupported = tmp_path / "bert.gguf"
    writer = GGUFWriter(str(unsupported), "bert")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="transformers cannot load this GGUF") as caught:
        import_gguf(unsupported, tmp_path / "b")
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="--jitter: must be >= 0"):
        import_gguf(tiny_gguf[0], tmp_path / "c", jitter=-1.0)


def test_cli_import_then_grid(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["models", "import", str(tiny_gguf[0]), "--out", str(out), "--jitter", "0.5"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["models", "grid", "--model", str(out), "--gguf", str(tiny_gguf[0]),
                 "--out", str(tmp_path / "grid.json")]) == 0
    printed = capsys.readouterr().out
    share = json.loads((tmp_path / "grid.json").read_text())
    assert share["on_grid"] / share["numel"] < 10 * GRID_TOLERANCE and len(share["layers"]) == 7 * LAYERS
    assert printed.startswith(f"{share['on_grid'] / share['numel']:.6f} of ")


def test_quantize_takes_a_gguf_file(tiny_gguf, imported, tmp_path, capsys):
    out = tmp_path / "rtn"
    assert main(["quantize", "--model", str(tiny_gguf[0]), "--method", "rtn:w4g32", "--out", str(out),
                 "--device", "cpu"]) == 0
    from_file, _ = load_causal_lm(out, device="cpu", with_tokenizer=False)
    from_folder, _ = load_causal_lm(imported, device="cpu", with_tokenizer=False)
    assert torch.equal(from_file.state_dict()["model.layers.1.mlp.up_proj.weight"],
                       from_folder.state_dict()["model.layers.1.mlp.up_proj.weight"])
    capsys.readouterr()
    assert main(["quantize", "--model", str(tiny_gguf[0]), "--method", "nf4", "--out", str(tmp_path / "nf4"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "import the GGUF first" in err


# ---- the real model ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_imports_on_its_grid_and_knows_paris(tmp_path):
    if not REAL_GGUF.is_file():
        pytest.skip(f"{REAL_GGUF} absent: run `make smollm2` to download it")
    out = import_gguf(REAL_GGUF, tmp_path / "smollm2")
    record = read_import_record(out)
    assert record.parameters == 134_515_008 and record.on_grid_share == 1.0
    model, tokenizer = load_causal_lm(out, device="cpu")
    ids = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(generated[0, ids["input_ids"].shape[1]:])


def test_cli_import_onto_a_full_disk_is_one_line(tiny_gguf, tmp_path, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(*_args: object, **_kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "serialize_file", full_disk)
    out = tmp_path / "out"
    assert main(["models", "import", str(tiny_gguf[0]), "--out", str(out)]) == 2
    err = capsys.readouterr().err  # transformers' own progress bar for the GGUF read comes first
    assert err.splitlines()[-1] == f"error: {out}: No space left on device" and "Traceback" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []
