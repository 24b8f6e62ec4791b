"""What a model is, for the keys that decide whether earlier work may be reused (an unlearning run's resume and
reuse, NPO's cached reference NLLs): the bytes of its weights and config, not where they lie. A target retrained
into the same folder keeps its path but not its weights; a key on the path hands back work done on the old ones.

Reads files only, without torch or transformers (like `models.source`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from qrunlearn.models.source import resolve_model_path

# The files that fix a model's outputs: its weights (one file, or shards and their index) and config.json. The
# tokenizer is left out: a run keys on the tokens it produced.
CONTENT_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json")

# File digests already computed in this process, under what a rewrite of the file changes short of its bytes:
# (resolved path, size, mtime_ns, inode; a file replaced by a rename has a new inode).
_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def model_identity(model_path: str) -> str:
    """"sha256:<hex>" over the content files' names and bytes of the model at `model_path` (a folder holding a model
    stands for it, see `resolve_model_path`; a GGUF file is its own content), or for a hub id (not an existing path)
    the id itself. A moved or copied folder keeps its identity; weights rewritten in place change it.

    Each file is read once per process (a 7B folder is ~13.5 GB, streamed, never held whole): its digest is kept
    under its size, mtime and inode, so a rewritten file is read again."""
    path = Path(model_path)
    if not path.exists():
        return model_path
    files = [path] if path.is_file() else _content_files(resolve_model_path(path))
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{_file_digest(file)}\0".encode())
    return f"sha256:{digest.hexdigest()}"


def _content_files(folder: Path) -> list[Path]:
    return sorted({file for pattern in CONTENT_FILES for file in folder.glob(pattern)}, key=lambda file: file.name)


def _file_digest(file: Path) -> str:
    resolved = file.resolve()  # a hub cache's snapshot links to its blobs
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _DIGESTS:
        with resolved.open("rb") as handle:
            _DIGESTS[key] = hashlib.file_digest(handle, "sha256").hexdigest()
    return _DIGESTS[key]
