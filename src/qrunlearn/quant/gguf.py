"""llama.cpp's GGUF formats, made and run by llama.cpp itself (the optional `make llamacpp` extra).

`gguf:TYPE`: the model is exported to an f32 GGUF (`models.gguf_export`), quantized by llama.cpp's own
`llama_model_quantize` with its default rules for TYPE (a "q4_k_m" file mixes q4_K, q6_K and, where a row length is
not a multiple of 256, legacy fallbacks; token embeddings and the output head are quantized too, as a shipped file
has them), and evaluated in llama.cpp (`models.llamacpp.LlamaCppModel`). The tensor types the file really holds are
read back and reported, since the type name alone does not say them.

Unlike the torch backends there is no model-in-memory form: a model folder goes in, a .gguf file comes out.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import torch
from pydantic import BaseModel

from qrunlearn.errors import UserError
from qrunlearn.models.gguf_export import export_gguf
from qrunlearn.models.llamacpp import LlamaCppModel, import_llamacpp, require_llamacpp
from qrunlearn.models.source import GGUF_FILE
from qrunlearn.quant.spec import GGUF_TYPES, QuantSpec


class TensorTypes(BaseModel):
    """What a GGUF file holds: tensor count per llama.cpp tensor type, and the bytes of its tensor data."""

    counts: dict[str, int]
    weight_bytes: int

    def summary(self) -> str:
        parts = ", ".join(f"{n} {name}" for name, n in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        return f"{parts} ({self.weight_bytes / 2**20:.1f} MiB of tensors)"


def tensor_types(path: Path | str) -> TensorTypes:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    counts = Counter(tensor.tensor_type.name.lower() for tensor in reader.tensors)
    return TensorTypes(counts=dict(counts), weight_bytes=int(sum(int(t.n_bytes) for t in reader.tensors)))


def quantize_file(source: Path, out: Path, spec: QuantSpec, threads: int | None = None) -> TensorTypes:
    """llama.cpp's quantizer: `source` (an f32 GGUF) -> `out` at `spec`'s type, written beside and renamed."""
    llama_cpp = import_llamacpp()
    assert spec.gguf_type is not None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[spec.gguf_type]
    params.nthread = threads or torch.get_num_threads()
    partial = out.with_name(f".{out.name}.partial")
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
        if status != 0:
            raise UserError(f"llama.cpp could not quantize to {spec.gguf_type} (llama_model_quantize returned "
                            f"{status})")
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return tensor_types(out)


def write_gguf(model, tokenizer, spec: QuantSpec, out: Path, threads: int | None = None) -> TensorTypes:
    """The model at `spec` as one .gguf file at `out` (f32 export, then llama.cpp's quantizer)."""
    with tempfile.TemporaryDirectory(prefix="qrunlearn-gguf-") as scratch:
        source = export_gguf(model, tokenizer, Path(scratch) / "model-f32.gguf", dtype="f32")
        if spec.gguf_type == "f32":
            source.replace(out)
            return tensor_types(out)
        return quantize_file(source, out, spec, threads)


def open_quantized(model, tokenizer, spec: QuantSpec) -> tuple[LlamaCppModel, TensorTypes]:
    """`model` written at `spec` into a temporary file and loaded in llama.cpp (the file lives as long as the
    returned model)."""
    require_llamacpp()
    scratch = tempfile.TemporaryDirectory(prefix="qrunlearn-gguf-")
    path = Path(scratch.name) / GGUF_FILE
    types = write_gguf(model, tokenizer, spec, path)
    loaded = LlamaCppModel(path, model.config, getattr(model, "generation_config", None), keep_alive=scratch)
    return loaded, types


def save_folder(model, tokenizer, spec: QuantSpec, folder: Path) -> TensorTypes:
    """`qrunlearn quantize`'s output for a gguf spec: model.gguf plus the config it was made from (the evaluation
    reads the context length and stop tokens there); returns the tensor types written."""
    types = write_gguf(model, tokenizer, spec, folder / GGUF_FILE)
    model.config.save_pretrained(str(folder))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(str(folder))
    return types


def load_folder(folder: Path) -> LlamaCppModel:
    """The model.gguf of a folder `save_folder` wrote, loaded in llama.cpp."""
    from transformers import AutoConfig, GenerationConfig

    path = folder / GGUF_FILE
    if not path.exists():
        raise UserError(f"{folder}: no {GGUF_FILE} here (write one with qrunlearn quantize --method gguf:TYPE)")
    config = AutoConfig.from_pretrained(str(folder))
    try:
        generation_config = GenerationConfig.from_pretrained(str(folder))
    except OSError:
        generation_config = None
    return LlamaCppModel(path, config, generation_config)
