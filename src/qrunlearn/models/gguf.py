"""GGUF checkpoints (llama.cpp's single-file format) as plain Hugging Face models, and the 4-bit grid they sit on.

- `import_gguf`: dequantize a GGUF through transformers and write a standard HF folder (fp32 safetensors, config,
  tokenizer, generation config) plus `qrunlearn_gguf.json`, a record of where it came from.
- `load_gguf_model` / `load_gguf_tokenizer`: the same, in memory; `load_causal_lm` uses them for `.gguf` paths.
- `q4_1_grid_share`: how many block-linear weights still lie exactly on the Q4_1 grid of the file they came from.

Why the grid matters: a model imported from a Q4_1 file is not a "full-precision" base. Every weight of a block
linear layer is `d * q + m` (q in 0..15; d, m fp16 per block of 32 consecutive inputs), so a 4-bit quantizer with
similar groups can land exactly on the original codes, and an unlearning update smaller than half a step can vanish
under re-quantization for reasons that have nothing to do with unlearning. `jitter` moves every such weight
uniformly inside its bin (+- jitter * d / 2), a control that keeps the function close but takes it off the grid.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFReader, ReaderTensor, get_tensor_name_map
from pydantic import BaseModel, ConfigDict
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from qrunlearn.errors import UserError
from qrunlearn.io import atomic_directory, atomic_write_json
from qrunlearn.models.layers import is_plain_linear, linear_weight, target_linear_names
from qrunlearn.models.source import is_gguf

if TYPE_CHECKING:  # importing modeling_utils costs seconds; `load_causal_lm`'s module imports this one
    from transformers import PreTrainedModel

IMPORT_RECORD = "qrunlearn_gguf.json"
Q4_1_BLOCK = 32  # weights per block, consecutive along the input dimension
Q4_1_BLOCK_BYTES = 20  # fp16 d, fp16 m, 16 bytes of 4-bit codes
Q4_1_LEVELS = 15
# On the grid: within this fraction of the block's step d of `d * q + m`. fp32 rounding of a dequantized value is
# ~1e-6 d; an unlearning update of 1e-5 on a step of ~1e-2 is 1e-3 d, well outside.
GRID_TOLERANCE = 1e-4
# llama.cpp's converter interleaves the two rotary halves of each head's q/k rows for these architectures, and
# transformers undoes it on load (`LlamaTensorProcessor`); the block parameters must be reordered the same way.
ROTARY_PERMUTED_ARCHITECTURES = ("llama",)
# Below this on-grid share right after loading, the file's blocks are not laid out the way qrunlearn maps them.
LAYOUT_CHECK_SHARE = 0.999


def open_gguf(path: Path | str) -> GGUFReader:
    """A reader over `path` (memory-mapped; nothing is loaded yet); one-line errors for a missing, non-GGUF or
    corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: GGUF file not found")
    if not is_gguf(path):
        raise UserError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as err:
        raise UserError(f"{path}: corrupt GGUF file ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _field(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return field.contents() if field is not None else default


def gguf_architecture(reader: GGUFReader) -> str:
    architecture = _field(reader, "general.architecture")
    if not isinstance(architecture, str):
        raise UserError(f"{reader.data.filename}: no general.architecture field (not a model GGUF)")
    return architecture


# ---- loading ----------------------------------------------------------------------------------------------------
def load_gguf_model(path: Path | str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The GGUF's model, dequantized, as a plain transformers model in `dtype` (in eval mode, on CPU).

    transformers loads a GGUF into a model marked "quantized with gguf" that refuses `save_pretrained`; the
    weights it holds are already dequantized, so they are copied into a fresh model built from the same config."""
    path = Path(path)
    open_gguf(path)  # one-line errors for non-GGUF and corrupt files before transformers sees them
    hf_logging.disable_progress_bar()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                      trust_remote_code=False)
    except (ValueError, KeyError, OSError, NotImplementedError) as err:
        raise UserError(f"{path}: transformers cannot load this GGUF as a causal LM ({_first_line(err)})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the rebuilt model holds plain tensors
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.eval()
    return model


def load_gguf_tokenizer(path: Path | str):
    """The tokenizer a GGUF describes in its `tokenizer.ggml.*` metadata, as a fast transformers tokenizer."""
    path = Path(path)
    open_gguf(path)
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as err:
        raise UserError(f"{path}: cannot build its tokenizer ({_first_line(err)})") from None


# ---- the Q4_1 grid ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockGrid:
    """The Q4_1 grid of one block-linear weight, laid out like the transformers weight [out, in]: step `scale` (d)
    and offset `minimum` (m) per block of 32 consecutive inputs, each [out, in / 32] in float64."""

    module: str
    scale: torch.Tensor
    minimum: torch.Tensor

    def blocked(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` [out, in] viewed as [out, in / 32, 32], so that `scale[..., None]` broadcasts over each block."""
        return weight.reshape(weight.shape[0], -1, Q4_1_BLOCK)


def unpermute_rotary_rows(values: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf's `permute`), as transformers does on load: rows
    come back in transformers' order, whatever trails them (weights, or one value per block)."""
    rows = values.shape[0]
    grouped = values.reshape(n_head, rows // n_head // 2, 2, *values.shape[1:])
    return grouped.swapaxes(2, 1).reshape(values.shape)


def _block_parameters(tensor: ReaderTensor) -> tuple[np.ndarray, np.ndarray]:
    """(d, m) of a 2-D Q4_1 tensor in the file's row order, each [rows, blocks per row] as float64."""
    rows = tensor.data.shape[0]
    blocks = np.ascontiguousarray(tensor.data).reshape(rows, -1, Q4_1_BLOCK_BYTES)
    scale = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
    minimum = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
    return scale.astype(np.float64), minimum.astype(np.float64)


def _gguf_to_module_names(reader: GGUFReader, model: torch.nn.Module) -> dict[str, str]:
    """GGUF tensor base name ("blk.0.attn_q") -> transformers module name, for the block linear layers."""
    architecture = gguf_architecture(reader)
    arch = next((key for key, name in MODEL_ARCH_NAMES.items() if name == architecture), None)
    if arch is None:
        raise UserError(f"{reader.data.filename}: architecture '{architecture}' is unknown to the gguf package")
    block_count = int(_field(reader, f"{architecture}.block_count", 0))
    name_map = get_tensor_name_map(arch, block_count)
    mapping = {}
    for module_name in target_linear_names(model):
        gguf_name = name_map.get_name(module_name)
        if gguf_name is not None:
            mapping[gguf_name] = module_name
    return mapping


def _block_weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The [out, in] weight of block linear `name`. The grids are read against full-precision weights, so a
    quantized layer (whose `weight` holds packed codes or a dequantized copy) is a one-line error."""
    module = model.get_submodule(name)
    if not is_plain_linear(module):
        raise UserError(f"{name}: a {type(module).__name__}, not a full-precision linear layer; the Q4_1 grid "
                        "is compared with the unquantized model")
    return linear_weight(module)


def _hf_row_order(values: np.ndarray, gguf_name: str, reader: GGUFReader) -> np.ndarray:
    architecture = gguf_architecture(reader)
    if architecture not in ROTARY_PERMUTED_ARCHITECTURES:
        return values
    n_head = int(_field(reader, f"{architecture}.attention.head_count"))
    n_head_kv = int(_field(reader, f"{architecture}.attention.head_count_kv", n_head))
    if gguf_name.endswith(".attn_q"):
        return unpermute_rotary_rows(values, n_head)
    if gguf_name.endswith(".attn_k"):
        return unpermute_rotary_rows(values, n_head_kv)
    return values


def q4_1_block_grids(reader: GGUFReader, model: torch.nn.Module) -> list[BlockGrid]:
    """The grid of every block linear layer of `model` that the GGUF stores as Q4_1 (other types are skipped)."""
    module_names = _gguf_to_module_names(reader, model)
    grids = []
    for tensor in reader.tensors:
        base_name = tensor.name.removesuffix(".weight")
        if tensor.tensor_type != GGMLQuantizationType.Q4_1 or base_name not in module_names:
            continue
        module = module_names[base_name]
        scale, minimum = (_hf_row_order(values, base_name, reader) for values in _block_parameters(tensor))
        weight = _block_weight(model, module)
        if tuple(weight.shape) != (scale.shape[0], scale.shape[1] * Q4_1_BLOCK):
            raise UserError(f"{module}: weight {tuple(weight.shape)} does not match the GGUF's {tensor.name} "
                            f"({scale.shape[0]} x {scale.shape[1] * Q4_1_BLOCK}); not the model this file holds")
        grids.append(BlockGrid(module, torch.from_numpy(scale), torch.from_numpy(minimum)))
    return grids


class LayerGridShare(BaseModel):
    """One block linear layer: how many of its weights lie on their block's Q4_1 grid."""

    model_config = ConfigDict(frozen=True)

    name: str
    numel: int
    on_grid: int

    @property
    def share(self) -> float:
        return self.on_grid / self.numel


class GridShare(BaseModel):
    """The share of Q4_1 block-linear weights still on their original block's grid, per layer and overall."""

    model_config = ConfigDict(frozen=True)

    gguf: str
    tolerance: float  # a weight is on the grid within tolerance * d of d * q + m
    numel: int
    on_grid: int
    layers: list[LayerGridShare]

    @property
    def share(self) -> float | None:
        return self.on_grid / self.numel if self.numel else None

    def summary(self) -> str:
        if self.share is None:
            return f"{self.gguf}: no block linear layer is stored as Q4_1; no grid to measure"
        lowest = min(self.layers, key=lambda layer: layer.share)
        return (f"{self.share:.6f} of {self.numel:,} Q4_1 block-linear weights ({len(self.layers)} layers) lie on "
                f"the grid of {Path(self.gguf).name} (within {self.tolerance:g} d); lowest layer {lowest.name} "
                f"{lowest.share:.6f}")


def _on_grid_count(weight: torch.Tensor, grid: BlockGrid, tolerance: float) -> int:
    values = grid.blocked(weight.detach().to("cpu", torch.float64))
    step, offset = grid.scale[..., None], grid.minimum[..., None]
    safe_step = torch.where(step > 0, step, torch.ones_like(step))  # d = 0: a constant block, only m is on it
    code = ((values - offset) / safe_step).round_().clamp_(0, Q4_1_LEVELS)
    distance = values.sub_(code.mul_(step).add_(offset)).abs_()
    return int((distance <= tolerance * step).sum())


def grid_share(model: torch.nn.Module, grids: list[BlockGrid], gguf: Path | str,
               tolerance: float = GRID_TOLERANCE) -> GridShare:
    """Count `model`'s weights on the given grids (see `q4_1_grid_share`)."""
    layers = []
    for grid in grids:
        weight = _block_weight(model, grid.module)
        layers.append(LayerGridShare(name=grid.module, numel=weight.numel(),
                                     on_grid=_on_grid_count(weight, grid, tolerance)))
    return GridShare(gguf=str(gguf), tolerance=tolerance, numel=sum(layer.numel for layer in layers),
                     on_grid=sum(layer.on_grid for layer in layers), layers=layers)


def q4_1_grid_share(model: torch.nn.Module, gguf_path: Path | str, tolerance: float = GRID_TOLERANCE) -> GridShare:
    """The share of `model`'s block-linear weights that lie on the Q4_1 grid of the GGUF they came from: within
    `tolerance * d` of `d * q + m` (q in 0..15) with d and m read from that weight's block in the file.

    Right after `import_gguf` this is 1; after fine-tuning or unlearning it says how much of the base still sits
    exactly on a 4-bit grid. Layers the file stores in another type (Q8_0, F32, ...) are not counted."""
    reader = open_gguf(gguf_path)
    return grid_share(model, q4_1_block_grids(reader, model), gguf_path, tolerance)


def jitter_off_grid(model: torch.nn.Module, grids: list[BlockGrid], jitter: float, seed: int) -> None:
    """Add uniform noise in +- jitter * d / 2 to every weight on `grids` (d: its block's step), in place.

    jitter <= 1 keeps each weight inside its bin, so its nearest code does not change; only the exact grid
    position is lost. Seeded: the same seed gives the same weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for grid in grids:
            weight = _block_weight(model, grid.module)
            unit = torch.rand(weight.shape, generator=generator, dtype=torch.float64).mul_(2).sub_(1)
            noise = grid.blocked(unit).mul_(grid.scale[..., None] * (jitter / 2))
            weight.add_(noise.reshape(weight.shape).to(weight.device, weight.dtype))


# ---- import -----------------------------------------------------------------------------------------------------
class GGUFImportRecord(BaseModel):
    """Where an imported folder came from (`qrunlearn_gguf.json` beside its weights)."""

    source: str
    sha256: str
    architecture: str
    tensor_types: dict[str, int]  # GGML type -> how many tensors the file stores in it, e.g. {"Q4_1": 210}
    parameters: int
    jitter: float
    seed: int
    on_grid_share_loaded: float | None  # Q4_1 block-linear weights on their grid as dequantized (should be 1)
    on_grid_share: float | None  # the same as written, after any jitter (None: no Q4_1 block linear layer)
    time_utc: str
    versions: dict[str, str | None]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in ("qrunlearn", "transformers", "gguf"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def _jittered(model: PreTrainedModel, grids: list[BlockGrid], loaded: GridShare, path: Path, architecture: str,
              jitter: float, seed: int) -> GridShare:
    """Jitter the model in place and return its new grid share; refuses when the noise scale would be wrong."""
    if not grids:
        raise UserError(f"{path}: --jitter needs Q4_1 block linear layers and this file has none")
    if loaded.share is not None and loaded.share < LAYOUT_CHECK_SHARE:
        raise UserError(f"{path}: only {loaded.share:.4f} of the loaded weights match the file's Q4_1 blocks; "
                        f"qrunlearn does not know how transformers lays out '{architecture}' tensors")
    jitter_off_grid(model, grids, jitter, seed)
    return grid_share(model, grids, path)


def import_gguf(gguf_path: Path | str, out_dir: Path | str, jitter: float = 0.0, seed: int = 0) -> Path:
    """Write `out_dir` (atomically): the GGUF's model as a standard HF folder (fp32 `model.safetensors`,
    config.json, generation_config.json, tokenizer files) and `qrunlearn_gguf.json` (source, sha256,
    architecture, parameter count, grid shares, jitter, time).

    `jitter` > 0 moves every Q4_1 block-linear weight off its grid by uniform noise of +- jitter * d / 2 (seeded
    by `seed`); jitter = 1 spans the whole bin. Returns `out_dir`."""
    if jitter < 0:
        raise UserError(f"--jitter: must be >= 0 (a fraction of the block step), got {jitter}")
    path, out_dir = Path(gguf_path), Path(out_dir)
    reader = open_gguf(path)
    model = load_gguf_model(path, torch.float32)
    tokenizer = load_gguf_tokenizer(path)
    grids = q4_1_block_grids(reader, model)
    loaded = grid_share(model, grids, path)
    architecture = gguf_architecture(reader)
    written = _jittered(model, grids, loaded, path, architecture, jitter, seed) if jitter > 0 else loaded
    record = GGUFImportRecord(
        source=str(path.resolve()), sha256=file_sha256(path), architecture=architecture,
        tensor_types=dict(Counter(tensor.tensor_type.name for tensor in reader.tensors)),
        parameters=model.num_parameters(), jitter=jitter, seed=seed, on_grid_share_loaded=loaded.share,
        on_grid_share=written.share, time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        versions=_versions())
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / IMPORT_RECORD, record)
    return out_dir


def read_import_record(model_dir: Path | str) -> GGUFImportRecord | None:
    """The record `import_gguf` left in `model_dir`, or None for a folder that did not come from a GGUF."""
    path = Path(model_dir) / IMPORT_RECORD
    return GGUFImportRecord.model_validate_json(path.read_text()) if path.is_file() else None
