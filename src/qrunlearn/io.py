"""Atomic file output and run provenance (config, seed, versions, git commit).

Every result file is written to a temporary sibling and renamed into place, so an interrupted run never
leaves a half-written file behind and never destroys what was there before.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

TRACKED_PACKAGES = (
    "qrunlearn", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors",
    "bitsandbytes", "hqq", "torchao", "rouge-score", "scikit-learn", "numpy",
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: str | Path, directory: bool = False) -> None:
    """mkstemp / mkdtemp create private files (0600 / 0700); results get the mode a plain open() would give."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_text(path: Path | str, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    _usual_mode(tmp)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    _usual_mode(tmp)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default, ensure_ascii=False) + "\n"


def atomic_write_json(path: Path | str, obj: Any) -> Path:
    return atomic_write_text(path, to_json(obj))


def replace_directory(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final` in one rename; an existing `final` is swapped out first and
    removed afterwards, so at every moment `final` is either the old folder or the new one."""
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextmanager
def atomic_directory(final: Path | str, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success it replaces `final` (`replace_directory`).

    On failure the temporary directory is removed and `final` (if any) is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    _usual_mode(tmp, directory=True)
    try:
        yield tmp
        if final.exists() and not overwrite:
            raise FileExistsError(final)
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(start: Path | str | None = None) -> str | None:
    """The commit of the qrunlearn checkout (or of `start`), with '+dirty' when there are local changes."""
    where = Path(start) if start is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=where, capture_output=True, text=True,
            timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def run_metadata(config: Any = None, seed: int | None = None) -> dict[str, Any]:
    """What makes a run reproducible: its resolved config, seed, package versions, commit, host."""
    return {
        "config": config,
        "seed": seed,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
