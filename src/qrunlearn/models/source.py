"""Where a model is, checked without importing torch or transformers, so the command line can reject a wrong
model folder at once (before ~5 s of imports) and every loader resolves folders the same way.

A model is named by a hub id, a folder or a GGUF file (recognised by its magic bytes, not its name). A folder may
be the model itself or one that another qrunlearn command wrote around it; `resolve_model_path` finds the model
inside. A command that writes a folder around a model leaves a pointer to it there (`write_model_pointer`), so this
module, which sits below those commands, never has to know their layouts; folders written before pointers existed
are read from the places those versions used (`LEGACY_MODEL_LOCATIONS`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from qrunlearn.errors import DataError, UserError
from qrunlearn.io import read_json_object

GGUF_FILE = "model.gguf"  # the file in a folder `qrunlearn quantize --method gguf:TYPE` writes

# The record a command leaves in a folder it wrote around a model: {"model": "<the model folder, relative to it>"}.
MODEL_POINTER = "qrunlearn-model.json"
POINTER_FIELD = "model"
# Where qrunlearn versions that wrote no pointer put the model, relative to the folder they wrote: `unlearn --out`
# (OUT/model) and a `run` cell folder (cells/<id>/unlearn/model). Read only for those older folders.
LEGACY_MODEL_LOCATIONS = ("model", "unlearn/model")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path | str) -> bool:
    """True for a file that starts with GGUF's magic bytes (whatever its name says)."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def write_model_pointer(folder: Path | str, model_dir: Path | str) -> Path:
    """Record in `folder` (a folder a command wrote around a model) that its model is `model_dir`, as a path
    relative to `folder`, so the pair can be moved or copied together. Written atomically; a pointer that already
    says so is left as it is (a resumed run touches none of the files it finished before)."""
    from qrunlearn.io import atomic_write_json  # here, not at the top: qrunlearn.io imports torch, this module must not

    folder = Path(folder)
    record = {POINTER_FIELD: Path(os.path.relpath(model_dir, folder)).as_posix()}
    pointer = folder / MODEL_POINTER
    if _read_json(pointer) == record:
        return pointer
    return atomic_write_json(pointer, record)


def _read_json(path: Path) -> object:
    """`path`'s JSON value; None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_model_pointer(folder: Path) -> Path | None:
    """The model folder `folder`'s pointer names; None when it has no pointer. A pointer that is not a JSON object
    whose "model" names a model folder (one with a config.json) is a one-line `UserError` naming it."""
    pointer = folder / MODEL_POINTER
    if not pointer.is_file():
        return None
    named = read_json_object(pointer).get(POINTER_FIELD)
    if not isinstance(named, str) or not named:
        raise DataError(pointer, "expected the model folder's path, as a string", field=POINTER_FIELD)
    model_dir = folder / named
    if not (model_dir / "config.json").is_file():
        raise DataError(pointer, f"{model_dir} is not a model folder (no config.json)", field=POINTER_FIELD)
    return model_dir


def resolve_model_path(path: str | Path) -> Path:
    """The model folder that `path` names or holds: `path` itself when it has a config.json, else the folder its
    pointer names (`MODEL_POINTER`), else the first of `LEGACY_MODEL_LOCATIONS` that has a config.json.

    A path that does not exist is returned unchanged (it may be a hub id; `ModelSource.check` decides). An
    existing folder with no model in any of those places is a `UserError` listing where it looked."""
    path = Path(path)
    if not path.is_dir():
        return path
    if (path / "config.json").is_file():
        return path
    pointed = read_model_pointer(path)
    if pointed is not None:
        return pointed
    legacy = [path / location for location in LEGACY_MODEL_LOCATIONS]
    for candidate in legacy:
        if (candidate / "config.json").is_file():
            return candidate
    looked = ", ".join(str(p) for p in (path / "config.json", path / MODEL_POINTER,
                                        *(candidate / "config.json" for candidate in legacy)))
    raise UserError(f"{path}: no model found (looked for {looked})")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).exists() for name in TOKENIZER_FILES)


def resolve_tokenizer_path(path: str | Path) -> Path:
    """A folder holding tokenizer files is a tokenizer folder as it is (`target --out` writes one without a
    model); any other is resolved like a model (`resolve_model_path`)."""
    path = Path(path)
    return path if path.is_dir() and _has_tokenizer(path) else resolve_model_path(path)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from; `is_local` says whether it is a folder on disk."""

    name_or_path: str

    @property
    def is_local(self) -> bool:
        return Path(self.name_or_path).exists()

    @property
    def is_gguf(self) -> bool:
        return is_gguf(self.name_or_path)

    def check(self) -> None:
        """Fail with one line when a local folder is not a loadable causal LM (a GGUF file is checked on load)."""
        if not self.is_local:
            if self.name_or_path.startswith((".", "/", "~")) or self.name_or_path.count("/") > 1:
                raise UserError(f"{self.name_or_path}: model folder not found")
            return  # a hub id: let the hub client decide
        path = Path(self.name_or_path)
        if self.is_gguf:
            return
        if path.is_file() and path.suffix.lower() == ".gguf":
            raise UserError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
        if not path.is_dir():
            raise UserError(f"{path}: not a model folder or a GGUF file")
        path = resolve_model_path(path)
        config_path = path / "config.json"
        config = read_json_object(config_path)
        architectures = config.get("architectures") or []
        if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
            raise UserError(f"{config_path}: field 'architectures' is {architectures}, not a causal LM")
        has_weights = (any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists()
                       or (path / GGUF_FILE).is_file())  # a folder `qrunlearn quantize --method gguf:TYPE` wrote
        if not has_weights:
            if any(path.glob("*.bin")) or any(path.glob("*.pt")):
                raise UserError(f"{path}: only pickle weights (.bin/.pt) found; qrunlearn loads safetensors only")
            raise UserError(f"{path}: no *.safetensors weights found")

    def check_tokenizer(self) -> None:
        if not self.is_local or self.is_gguf:  # a GGUF carries its tokenizer in its metadata
            return
        path = resolve_tokenizer_path(self.name_or_path)
        if not _has_tokenizer(path):
            raise UserError(f"{path}: missing tokenizer (none of {', '.join(TOKENIZER_FILES)})")
