"""Where a model is, checked without importing torch or transformers, so the command line can reject a wrong
model folder at once (before ~5 s of imports) and every loader resolves folders the same way.

A model is named by a hub id, a folder or a GGUF file (recognised by its magic bytes, not its name). A folder may
be the model itself or one that another qrunlearn command wrote around it; `resolve_model_path` finds the model
inside (`unlearn --out OUT` -> OUT/model, a `run` cell folder -> cells/<id>/unlearn/model; a `quantize --out`
folder is a model folder itself).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qrunlearn.errors import UserError

GGUF_FILE = "model.gguf"  # the file in a folder `qrunlearn quantize --method gguf:TYPE` writes

# Where other qrunlearn commands put the model inside the folder they write, relative to that folder: a model
# folder itself (also `quantize --out`), `unlearn --out`, a `run` cell folder.
MODEL_LOCATIONS = (".", "model", "unlearn/model")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path | str) -> bool:
    """True for a file that starts with GGUF's magic bytes (whatever its name says)."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def resolve_model_path(path: str | Path) -> Path:
    """The model folder that `path` names or holds: `path` itself when it has a config.json, else the first of
    `path/model` (an `unlearn --out` folder) and `path/unlearn/model` (a `run` cell folder) that has one.

    A path that does not exist is returned unchanged (it may be a hub id; `ModelSource.check` decides). An
    existing folder with no model in any of those places is a `UserError` listing where it looked."""
    path = Path(path)
    if not path.is_dir():
        return path
    candidates = [path / location for location in MODEL_LOCATIONS]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    looked = ", ".join(str(candidate / "config.json") for candidate in candidates)
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
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8 text"
            raise UserError(f"{config_path}: invalid JSON ({reason})") from None
        if not isinstance(config, dict):
            raise UserError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
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
