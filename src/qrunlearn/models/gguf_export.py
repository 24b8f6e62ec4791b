"""A Hugging Face Llama-family model -> one GGUF file (f32 or f16), the input llama.cpp's quantizer takes.

The layout follows llama.cpp's own converter (`convert_hf_to_gguf.py`, LlamaModel): tensor names from gguf-py's
name map, the query and key rows permuted into llama.cpp's rotary order (the inverse of what transformers undoes
on import), norms kept in f32, `output.weight` left out when the head is tied to the embeddings. The vocabulary is
written so llama.cpp can load the file; qrunlearn feeds llama.cpp token ids from the model's own tokenizer, so
llama.cpp's tokenizer (and its pre-tokenizer guess) never decides what a text is.

Checked by re-importing: transformers' GGUF loader reads an exported f32 file back to the same logits
(tests/models/test_gguf_export.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from qrunlearn.errors import UserError

ExportDType = Literal["f32", "f16"]
# Architectures whose weights map one to one onto llama.cpp's "llama" graph (Mistral's GGUFs are "llama" too).
LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5


def rotary_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a query or key projection from transformers' half-split rotary order to llama.cpp's interleaved
    one (per head: rows [0, d/2) and [d/2, d) become pairs)."""
    rows = weights.shape[0]
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def check_exportable(model) -> None:
    """One-line UserError when llama.cpp's llama graph cannot run `model` as it is."""
    architectures = tuple(getattr(model.config, "architectures", None) or (type(model).__name__,))
    if not set(architectures) & set(LLAMA_ARCHITECTURES):
        raise UserError(f"GGUF export supports {', '.join(LLAMA_ARCHITECTURES)}; this model is "
                        f"{', '.join(architectures)}")
    config = model.config
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError("GGUF export: linear biases are not supported (attention_bias / mlp_bias)")
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", None):
        raise UserError(f"GGUF export: rope scaling '{rope.get('rope_type')}' is not supported")
    if any(not isinstance(p, torch.Tensor) or not p.is_floating_point() for p in model.state_dict().values()):
        raise UserError("GGUF export needs a full-precision model (this one holds quantized weights)")


def _rope_parameters(config) -> dict:
    parameters = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" not in parameters and getattr(config, "rope_theta", None) is not None:
        parameters = {**parameters, "rope_theta": config.rope_theta}
    return dict(parameters)


def _vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings by id and their llama.cpp token types; ids the tokenizer does not use (an embedding padded past
    the vocabulary) get placeholder names, as llama.cpp's converter writes them."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    added = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(_TOKEN_UNUSED)
            continue
        tokens.append(by_id[index])
        types.append(_TOKEN_CONTROL if index in special else _TOKEN_USER_DEFINED if index in added else _TOKEN_NORMAL)
    return tokens, types


def _merges(tokenizer) -> list[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("GGUF export needs a fast (tokenizers) BPE tokenizer")
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')}")
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _write_metadata(writer, model, tokenizer, dtype: ExportDType, name: str) -> None:
    import gguf

    config = model.config
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(_rope_parameters(config).get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    tokens, types = _vocabulary(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer))
    for setter, value in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id)):
        if value is not None:
            setter(int(value))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))


def _tensors(model, dtype: ExportDType):
    """(GGUF name, array) for every weight, in llama.cpp's layout."""
    import gguf

    config = model.config
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if "rotary_emb" in hf_name:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"GGUF export: no llama.cpp name for tensor '{hf_name}'")
        values = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            values = rotary_permute(values, n_head)
        elif hf_name.endswith("k_proj.weight"):
            values = rotary_permute(values, n_kv)
        if dtype == "f16" and values.ndim > 1:
            values = values.astype(np.float16)
        yield name, np.ascontiguousarray(values)


def export_gguf(model, tokenizer, path: Path | str, dtype: ExportDType = "f32", name: str = "qrunlearn") -> Path:
    """Write `model` (a full-precision Llama-family causal LM) with its tokenizer as one GGUF file at `path`
    (atomically: written beside it, then renamed)."""
    import gguf

    check_exportable(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(str(partial), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _write_metadata(writer, model, tokenizer, dtype, name)
        for tensor_name, values in _tensors(model, dtype):
            writer.add_tensor(tensor_name, values)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path
