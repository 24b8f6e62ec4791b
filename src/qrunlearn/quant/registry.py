"""One registry from a spec's method to its backend, plus the model-level entry points.

| method         | backend module | stores codes | serialises      | needs              |
| fp             | (no-op)        | -            | fp weights      | -                  |
| bf16           | quant/bf16.py  | bf16 weights | fp weights+spec | torch              |
| rtn            | quant/rtn.py   | int8 buffers | fp weights+spec | torch              |
| nf4, fp4, int8 | quant/bnb.py   | bnb layers   | HF bnb folder   | bitsandbytes       |
| hqq            | quant/hqq.py   | HQQLinear    | fp weights+spec | hqq                |
| gptq           | quant/gptq.py  | llmcompressor| compressed HF   | llmcompressor (own venv) |
| awq            | quant/awq.py   | llmcompressor| compressed HF   | llmcompressor (own venv) |
| gguf           | quant/gguf.py  | llama.cpp    | model.gguf      | llama-cpp-python (make llamacpp) |
Backends are imported lazily: a missing package gives one line with the install command.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qrunlearn.errors import MissingDependencyError, UserError
from qrunlearn.io import atomic_directory, atomic_write_json, run_metadata
from qrunlearn.models.layers import is_plain_linear, linear_weight, target_linear_names
from qrunlearn.models.loading import DTypeName, default_device, load_causal_lm, load_tokenizer
from qrunlearn.models.source import is_gguf, resolve_model_path
from qrunlearn.quant.common import FULL_PRECISION_NOTE, QuantizedWeight, check_group_divides
from qrunlearn.quant.spec import CALIBRATED_METHODS, QuantSpec, parse_spec

logger = logging.getLogger("qrunlearn.quant")
SPEC_FILE = "qrunlearn_quant.json"  # written beside fp weights when the backend does not serialise


@dataclass(frozen=True)
class Backend:
    methods: tuple[str, ...]
    module: str  # qrunlearn.quant.<module>
    package: str | None  # the optional package it imports, None for plain torch
    serialises: bool  # True: `qrunlearn quantize` writes a quantized HF folder; False: fp weights + spec
    per_weight: bool  # True: a weight can be quantized on its own (survival diagnostics work without data)


BACKENDS: dict[str, Backend] = {
    "bf16": Backend(("bf16",), "bf16", None, serialises=False, per_weight=True),
    "rtn": Backend(("rtn",), "rtn", None, serialises=False, per_weight=True),
    "bnb": Backend(("nf4", "fp4", "int8"), "bnb", "bitsandbytes", serialises=True, per_weight=True),
    "hqq": Backend(("hqq",), "hqq", "hqq", serialises=False, per_weight=True),
    "gptq": Backend(("gptq",), "gptq", "llmcompressor", serialises=True, per_weight=False),
    "awq": Backend(("awq",), "awq", "llmcompressor", serialises=True, per_weight=False),
    "gguf": Backend(("gguf",), "gguf", "llama_cpp", serialises=True, per_weight=False),
}
METHOD_TO_BACKEND: dict[str, str] = {m: name for name, b in BACKENDS.items() for m in b.methods}


def _backend(spec: QuantSpec) -> Backend:
    return BACKENDS[METHOD_TO_BACKEND[spec.method]]


def _module(spec: QuantSpec):
    return importlib.import_module(f"qrunlearn.quant.{_backend(spec).module}")


def available_methods() -> dict[str, bool]:
    """Every method (plus fp) and whether its backend package is importable here."""
    out = {"fp": True}
    for method, name in METHOD_TO_BACKEND.items():
        package = BACKENDS[name].package
        out[method] = package is None or importlib.util.find_spec(package) is not None
    return out


def quantize_model(model: nn.Module, spec: QuantSpec | str, calibration=None) -> nn.Module:
    """Quantize every linear layer inside the transformer blocks in place (embeddings, lm_head untouched) on the
    model's device and return the model. `calibration` (a gptq.Calibration) is used by GPTQ and AWQ only."""
    spec = parse_spec(spec)
    if spec.is_noop:
        return model
    require_backend(spec)
    if spec.method == "gguf":
        raise UserError(f"{spec.label}: llama.cpp quantizes a model folder, not a model in memory; use "
                        f"`qrunlearn quantize --method {spec.label}` or load_quantized(folder, '{spec.label}')")
    if spec.method in CALIBRATED_METHODS:
        return _module(spec).quantize_model(model, spec, calibration)
    model = _module(spec).quantize_model(model, spec)
    model.eval()
    return model


def has_weight_codes(spec: QuantSpec) -> bool:
    """Whether a weight's codes under `spec` follow from the weight alone (what the survival diagnostics need):
    not for GPTQ (calibration data) nor llama.cpp (whole-file rules)."""
    return not spec.is_noop and _backend(spec).per_weight


def quantize_weight(weight: torch.Tensor, spec: QuantSpec | str) -> QuantizedWeight:
    """Codes, dequantized values and step of one [out, in] weight under `spec` (no model needed)."""
    spec = parse_spec(spec)
    if spec.is_noop:
        raise UserError("spec 'fp' has no codes: choose a quantizer")
    if spec.method == "gguf":
        raise UserError(f"{spec.label}: llama.cpp quantizes whole files, so there are no per-weight codes to "
                        "compare; the weight diagnostics cover the torch quantizers (rtn, nf4, fp4, int8, hqq, bf16)")
    if not _backend(spec).per_weight:
        raise UserError(f"{spec.label}: codes depend on calibration data, not on a weight alone; "
                        "quantize the model and read its codes instead")
    return _module(spec).quantize_weight(weight, spec)


def _stored_codes(module: nn.Module) -> torch.Tensor | None:
    """Codes a quantized module stores, whichever backend made it (None for a full-precision module)."""
    for name in BACKENDS:
        backend = BACKENDS[name]
        if backend.package is not None and importlib.util.find_spec(backend.package) is None:
            continue
        codes = importlib.import_module(f"qrunlearn.quant.{backend.module}").codes_from_module(module)
        if codes is not None:
            return codes
    return None


def quantized_codes(model_or_weight: nn.Module | torch.Tensor, spec: QuantSpec | str):
    """A weight tensor -> its codes under `spec`. A model -> {layer name: codes} for every block linear: read from
    the stored integers where the model is already quantized, computed from the weights where it is not."""
    spec = parse_spec(spec)
    if isinstance(model_or_weight, torch.Tensor):
        return quantize_weight(model_or_weight, spec).codes
    out: dict[str, torch.Tensor] = {}
    for name in target_linear_names(model_or_weight):
        module = model_or_weight.get_submodule(name)
        if is_plain_linear(module):
            out[name] = quantize_weight(linear_weight(module), spec).codes
        else:
            codes = _stored_codes(module)
            if codes is None:
                raise UserError(f"{name}: {type(module).__name__} is quantized by a backend qrunlearn cannot read")
            out[name] = codes
    return out


def describe(model: nn.Module, spec: QuantSpec) -> str:
    n = len(target_linear_names(model))
    if spec.is_noop:
        return f"fp: full precision, nothing quantized ({n} block linear layers kept as they are)"
    if spec.method == "gguf":
        return (f"{spec.label}: llama.cpp's quantizer with its own rules for every tensor (embeddings and output "
                "head included); the types it wrote are listed below")
    return f"{spec.label}: {n} linear layers inside the transformer blocks quantized; {FULL_PRECISION_NOTE}"


def save_quantized(model_dir: Path | str, spec: QuantSpec | str, out_dir: Path | str,
                   device: torch.device | None = None, calibration=None) -> str:
    """Write `out_dir` (atomically): a quantized HF folder where the backend serialises (bitsandbytes), otherwise the
    full-precision weights plus `qrunlearn_quant.json` naming the spec that `load_quantized` re-applies.
    Returns a one-line description of what was written."""
    spec = parse_spec(spec)
    model_dir, out_dir = resolve_model_path(model_dir), Path(out_dir)
    device = torch.device(device) if device is not None else default_device()
    require_backend(spec)
    if is_gguf(model_dir) and not spec.is_noop and _backend(spec).module == "bnb":
        raise UserError(f"{model_dir}: bitsandbytes re-reads the model from a folder; import the GGUF first "
                        f"(qrunlearn models import {model_dir} --out DIR) and quantize that folder")
    model, tokenizer = load_causal_lm(model_dir, device=device)
    # Validate the spec against this model (group sizes) before writing anything.
    check_group_divides(model, spec.row_group, spec.label)
    summary = describe(model, spec)
    meta = {"spec": spec.label, "layers": target_linear_names(model), "full_precision": FULL_PRECISION_NOTE,
            "source": str(model_dir), "metadata": run_metadata({"model": str(model_dir), "spec": spec.label}, None)}
    with atomic_directory(out_dir) as tmp:
        if spec.method in CALIBRATED_METHODS:
            quantize_model(model, spec, calibration)
            model.save_pretrained(str(tmp), save_compressed=True)
            meta["format"] = "llmcompressor compressed-tensors folder"
        elif spec.method == "gguf":
            types = _module(spec).save_folder(model, tokenizer, spec, tmp)
            meta["format"] = f"llama.cpp GGUF ({_module(spec).GGUF_FILE}: {types.summary()})"
            meta["tensor_types"] = types.model_dump()
        elif not spec.is_noop and _backend(spec).serialises:
            _module(spec).save_quantized(model_dir, spec, tmp, device)
            meta["format"] = "Hugging Face bitsandbytes folder"
        else:
            model.save_pretrained(str(tmp))
            meta["format"] = "full-precision weights; the spec is re-applied on load"
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / SPEC_FILE, meta)
    return f"{summary}\nwrote {out_dir} ({meta['format']})"


def require_backend(spec: QuantSpec) -> None:
    """Raise the one-line install hint when the spec's backend package is missing."""
    if spec.is_noop:
        return
    backend = _backend(spec)
    if backend.package is not None and importlib.util.find_spec(backend.package) is None:
        if spec.method in CALIBRATED_METHODS:
            raise MissingDependencyError(backend.package, f"{spec.method.upper()} (in its own environment: make "
                                         "gptq-venv)", "gptq")
        if spec.method == "gguf":
            _module(spec).require_llamacpp(spec.label)
        raise MissingDependencyError(backend.package, f"{spec.label} quantization", "quant")


def load_quantized(model_dir: Path | str, spec: QuantSpec | str | None = None,
                   device: str | torch.device | None = None, calibration_texts: Sequence[str] | None = None,
                   calibration_seed: int = 0):
    """(model, tokenizer) quantized with `spec` on `device` (default: CUDA if present, else CPU).
    A folder written by `qrunlearn quantize` is understood: a bnb folder loads as saved; an fp folder with a spec
    file gets that spec re-applied (`spec` may be None; when given, it must match). Any other HF folder: fp weights
    quantized with `spec` (GPTQ and AWQ calibrated on `calibration_texts`, the retain documents, with the model's
    own tokenizer). A folder holding a model (`resolve_model_path`) stands for that model."""
    model_dir = resolve_model_path(model_dir)
    device = torch.device(device) if device is not None else default_device()
    saved = _saved_spec(model_dir)
    wanted = parse_spec(spec) if spec is not None else saved
    if wanted is None:
        raise UserError(f"{model_dir}: no {SPEC_FILE} here; pass a quantization spec")
    if saved is not None and wanted != saved:
        raise UserError(f"{model_dir}: holds a {saved.label} model, not {wanted.label}")
    if wanted.method == "gguf":
        return _load_gguf(model_dir, wanted, from_folder=saved is not None)
    config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").exists() else {}
    if "quantization_config" in config:
        require_backend(wanted)
        if wanted.method in CALIBRATED_METHODS:  # transformers reads compressed-tensors folders (llmcompressor)
            return load_causal_lm(model_dir, device=device)
        if _backend(wanted).module != "bnb":
            raise UserError(f"{model_dir}: a pre-quantized folder that is not {wanted.label}")
        model = _module(wanted).load_serialised(model_dir, device)
        tokenizer = load_tokenizer(model_dir)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer
    require_backend(wanted)
    model, tokenizer = load_causal_lm(model_dir, device=device)
    calibration = None
    if wanted.method in CALIBRATED_METHODS:
        from qrunlearn.quant.gptq import Calibration

        if not calibration_texts:
            raise UserError(f"{wanted.label}: needs calibration text, and the corpus has no raw/retain1 split")
        calibration = Calibration(texts=tuple(calibration_texts), tokenizer=tokenizer, seed=calibration_seed)
    return quantize_model(model, wanted, calibration), tokenizer


def _load_gguf(model_dir: Path, spec: QuantSpec, from_folder: bool):
    """(llama.cpp model, tokenizer): the folder's model.gguf when `qrunlearn quantize` wrote it, else the folder's
    full-precision model exported and quantized by llama.cpp now. llama.cpp runs on the CPU, whatever the device."""
    require_backend(spec)
    backend = _module(spec)
    if from_folder:
        return backend.load_folder(model_dir), load_tokenizer(model_dir)
    model, tokenizer = load_causal_lm(model_dir, device=torch.device("cpu"))
    loaded, types = backend.open_quantized(model, tokenizer, spec)
    logger.info("%s: %s", spec.label, types.summary())
    return loaded, tokenizer


def load_model_folder(model_dir: Path | str, dtype: DTypeName = "auto", device: str | torch.device | None = None):
    """(model, tokenizer, spec) for a model folder as it was written: a folder `qrunlearn quantize` wrote loads
    quantized (`load_quantized`; spec is the one it names), any other in full precision with `dtype` (spec None).
    Without this an RTN or HQQ folder, which holds full-precision weights plus the spec, would be evaluated in
    full precision."""
    saved = _saved_spec(resolve_model_path(model_dir))
    if saved is None:
        model, tokenizer = load_causal_lm(model_dir, dtype=dtype, device=device)
        return model, tokenizer, None
    model, tokenizer = load_quantized(model_dir, saved, device)
    return model, tokenizer, saved


def _saved_spec(model_dir: Path) -> QuantSpec | None:
    path = model_dir / SPEC_FILE
    if not path.exists():
        return None
    try:
        return parse_spec(json.loads(path.read_text())["spec"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path}: not a valid qrunlearn quantization file (field 'spec')") from None
