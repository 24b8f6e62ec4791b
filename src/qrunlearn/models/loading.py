"""Load any Hugging Face causal LM (local folder, hub id or GGUF file) with safe, device-appropriate defaults.

- safetensors only (`use_safetensors=True`), `trust_remote_code=False` unless the caller asks;
- fp32 on CPU and bf16 on CUDA unless a dtype is given;
- a pad token is set when the tokenizer has none (eos, else a new `<pad>`), since batched evaluation and
  training pad;
- a `.gguf` file (recognised by its magic bytes) is dequantized on load into a plain model (`models.gguf`).
- a folder another qrunlearn command wrote is accepted where a model is expected: `resolve_model_path`
  (qrunlearn.models.source) finds the model inside it (`unlearn --out OUT` -> OUT/model, a `run` cell folder ->
  cells/<id>/unlearn/model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from qrunlearn.errors import UserError
from qrunlearn.models.gguf import load_gguf_model, load_gguf_tokenizer
from qrunlearn.models.source import ModelSource, is_gguf, resolve_model_path, resolve_tokenizer_path

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: DTypeName | str, device: torch.device | str | None = None) -> torch.dtype:
    """The one place a dtype name becomes a torch dtype: "auto" is bf16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device or default_device()).type == "cuda" else torch.float32
    return DTYPES[name]


def source_dtype(name_or_path: str | Path) -> torch.dtype:
    """The dtype a model's config.json declares (fp32 when it declares none); hub ids read the hub's config.
    A GGUF file counts as fp32: that is what its dequantized weights are."""
    if is_gguf(name_or_path):
        return torch.float32
    try:
        config = AutoConfig.from_pretrained(str(resolve_model_path(name_or_path)))
    except (OSError, ValueError):
        return torch.float32
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = DTYPES.get(declared)
    return declared if isinstance(declared, torch.dtype) and declared in DTYPES.values() else torch.float32


def ensure_pad_token(tokenizer) -> None:
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False, padding_side: str = "left"):
    """The tokenizer of a hub id, a GGUF file, a model or tokenizer folder, or a folder holding a model
    (`resolve_model_path`), with a pad token and `padding_side` set."""
    source = ModelSource(str(name_or_path))
    source.check_tokenizer()
    if source.is_gguf:
        tokenizer = load_gguf_tokenizer(name_or_path)
    else:
        name_or_path = resolve_tokenizer_path(name_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise UserError(f"{name_or_path}: cannot load tokenizer ({str(err).splitlines()[0]})") from None
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(
    name_or_path: str | Path,
    dtype: DTypeName | torch.dtype = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
):
    """Return `(model, tokenizer)` (tokenizer None when `with_tokenizer=False`), model in eval mode.

    `name_or_path`: a Hugging Face folder, a hub id, a folder another qrunlearn command wrote (see
    `resolve_model_path`), or a `.gguf` file (dequantized to `dtype` on each load; `qrunlearn models import`
    converts it once instead)."""
    source = ModelSource(str(name_or_path))
    source.check()
    name_or_path = resolve_model_path(name_or_path)
    hf_logging.disable_progress_bar()  # a bar per load floods a grid's output; qrunlearn shows its own progress
    device = torch.device(device) if device is not None else default_device()
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    model: Any  # a transformers model: its attributes are dynamic, so typed loosely
    if source.is_gguf:
        model = load_gguf_model(name_or_path, torch_dtype)
    else:
        model = _load_hf_model(name_or_path, torch_dtype, trust_remote_code)
    model.to(device)
    model.eval()
    tokenizer = load_tokenizer(name_or_path, trust_remote_code) if with_tokenizer else None
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def _load_hf_model(name_or_path: str | Path, dtype: torch.dtype, trust_remote_code: bool):
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(name_or_path), dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{name_or_path}: cannot load as a causal LM ({str(err).splitlines()[0]})") from None
