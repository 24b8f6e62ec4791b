"""Atomic file output and run provenance (config, seed, versions, git commit).

Every result file is written to a temporary sibling and renamed into place, so an interrupted run never
leaves a half-written file behind and never destroys what was there before.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import shutil
import signal
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

from qrunlearn.errors import UserError

TRACKED_PACKAGES = (
    "qrunlearn", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors",
    "bitsandbytes", "hqq", "torchao", "scipy", "numpy",
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: str | Path, directory: bool = False) -> None:
    """mkstemp / mkdtemp create private files (0600 / 0700); results get the mode a plain open() would give."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


CRASH_AT_ENV = "QRUNLEARN_CRASH_AT"
CRASH_SIGNAL_ENV = "QRUNLEARN_CRASH_SIGNAL"


def crash_point(point: str, path: Path) -> None:
    """Fault injection, for the crash tests only (tests/test_crash_resume.py): when the environment variable
    QRUNLEARN_CRASH_AT is "<point>:<path suffix>" (e.g. "write:references/result.json") and names this point and
    a path ending in that suffix, the process kills itself with SIGKILL, as a power cut or the OOM killer would,
    at a moment too short to hit by watching the file system; with QRUNLEARN_CRASH_SIGNAL=INT it sends itself
    SIGINT instead, a Ctrl-C at that exact point. Unset, it costs one environment lookup."""
    wanted = os.environ.get(CRASH_AT_ENV)
    if not wanted:
        return
    name, _, suffix = wanted.partition(":")
    suffix_parts = Path(suffix).parts
    if name == point and suffix_parts and path.parts[-len(suffix_parts):] == suffix_parts:
        interrupt = os.environ.get(CRASH_SIGNAL_ENV) == "INT"
        os.kill(os.getpid(), signal.SIGINT if interrupt else signal.SIGKILL)


@contextmanager
def _temporary_sibling(path: Path) -> Iterator[tuple[int, str]]:
    """A temporary file beside `path` (an open descriptor and its name) for the body to fill; renamed onto `path`
    afterwards, removed if the body fails. An OSError (a full disk, a read-only folder) is raised again naming
    `path`, the file the user asked for, rather than the hidden temporary or nothing (a failed write() names no
    file at all)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        _usual_mode(tmp)
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def atomic_write_text(path: Path | str, text: str) -> Path:
    path = Path(path)
    with _temporary_sibling(path) as (fd, _), os.fdopen(fd, "w", encoding="utf-8") as handle:
        half = len(text) // 2
        handle.write(text[:half])
        handle.flush()
        crash_point("write", path)  # the crash tests stop here: a half-written temporary, `path` untouched
        handle.write(text[half:])
        handle.flush()
        os.fsync(handle.fileno())
    return path


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    path = Path(path)
    with _temporary_sibling(path) as (fd, _), os.fdopen(fd, "wb") as handle:
        handle.write(data)
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


def read_json_object(path: Path) -> dict:
    """`path`'s JSON object; a one-line UserError naming the file when it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8 text"
        raise UserError(f"{path}: invalid JSON ({reason})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def atomic_write_json(path: Path | str, obj: Any) -> Path:
    return atomic_write_text(path, to_json(obj))


def replace_directory(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final` in one rename; an existing `final` is swapped out first and
    removed afterwards, so at every moment `final` is either the old folder or the new one."""
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(final, trash)
        crash_point("swap", final)  # the crash tests stop here: `final` missing, its old copy in `trash`
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def restore_interrupted_swaps(folder: Path) -> None:
    """Tidy `folder` after a process writing in it was killed: a `replace_directory` cut between its two renames
    gets its old folder back, and the old copies and temporaries of finished or abandoned writes are removed.
    Only for a folder that no other process is writing to."""
    for old in sorted(folder.glob(".*.old-*")):
        final = folder / old.name[1:].rsplit(".old-", 1)[0]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
    for leftover in folder.glob(".*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def _library_os_error(err: BaseException, path: Path) -> OSError | None:
    """safetensors reports a failed write (a full disk, a read-only folder) as its own SafetensorError, with the
    OS error only in its text ("... No space left on device (os error 28)"): the OSError it stands for, naming
    `path`, so that the command line reports it as one line like any other failed write."""
    match = re.search(r"\(os error (\d+)\)", str(err))
    if type(err).__name__ != "SafetensorError" or match is None:
        return None
    number = int(match.group(1))
    return OSError(number, os.strerror(number), str(path))


@contextmanager
def library_write_errors(path: Path | str) -> Iterator[None]:
    """Within the block, a library's write failure that is an OS error in disguise (`_library_os_error`) is
    raised as that OSError, naming `path`."""
    try:
        yield
    except Exception as err:
        os_error = _library_os_error(err, Path(path))
        if os_error is None:
            raise
        raise os_error from err


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
        with library_write_errors(final):
            yield tmp
        if final.exists() and not overwrite:
            raise FileExistsError(final)
        for written in tmp.rglob("*"):  # libraries that write atomically themselves leave private (0600) files
            if written.is_file() and not written.is_symlink():
                _usual_mode(written)
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


def slug(label: str) -> str:
    """A label as a file-name part: 'lora+qat:nf4' -> 'lora_qat_nf4', 'rtn:w4g64' -> 'rtn_w4g64'."""
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")
