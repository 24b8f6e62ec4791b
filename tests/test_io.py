"""Atomic writes under failure: an OSError names the file the caller asked for and leaves no temporary and the old
content intact; a folder swap cut by a kill is put back; the crash tests' fault-injection hook fires only where
it is aimed. (End to end, with real kills: tests/test_crash_resume.py.)"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest

from qrunlearn import io
from qrunlearn.io import (
    CRASH_AT_ENV,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_text,
    crash_point,
    restore_interrupted_swaps,
)


def _no_space(*_args: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() and fsync() fail: naming no file


@pytest.mark.parametrize("write", [lambda p: atomic_write_text(p, "new"), lambda p: atomic_write_bytes(p, b"new")],
                         ids=["text", "bytes"])
def test_a_failed_write_names_the_file_and_keeps_the_old_one(write, tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    target.write_text("old")
    monkeypatch.setattr(os, "replace", _no_space)
    with pytest.raises(OSError) as caught:
        write(target)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_safetensors_full_disk_becomes_an_os_error_naming_the_folder(tmp_path, monkeypatch):
    """safetensors raises its own error type for a failed write (seen when a grid filled the disk); inside
    `atomic_directory` it becomes the OSError it stands for, so the CLI prints one line, and the old folder stays."""
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    def full_disk(*_args: object, **_kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    monkeypatch.setattr(safetensors.torch, "serialize_file", full_disk)
    with pytest.raises(OSError) as caught, atomic_directory(final) as tmp:
        safetensors.torch.save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(final)
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (final / "old.txt").read_text() == "old"
    # any other library error passes through unchanged
    with pytest.raises(SafetensorError, match="header too large"), atomic_directory(tmp_path / "other"):
        raise SafetensorError("Error while deserializing header: header too large")


def test_a_write_refused_by_the_folder_stays_a_permission_error(tmp_path, monkeypatch):
    def refused(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / ".x.tmp"))

    monkeypatch.setattr(io.tempfile, "mkstemp", refused)
    with pytest.raises(PermissionError) as caught:
        atomic_write_text(tmp_path / "table.md", "x")
    assert caught.value.filename == str(tmp_path / "table.md")


def test_a_cut_swap_gets_its_old_folder_back_and_leftovers_go(tmp_path):
    (tmp_path / ".checkpoint.old-12-345").mkdir()  # killed between the renames: only the old copy is left
    (tmp_path / ".checkpoint.old-12-345" / "state.json").write_text("epoch 1")
    (tmp_path / ".checkpoint.tmp").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / ".model.old-12-999").mkdir()  # killed while removing the old copy of a finished swap
    (tmp_path / ".unlearn.json.abc.tmp").write_text("{")
    restore_interrupted_swaps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "model"]
    assert (tmp_path / "checkpoint" / "state.json").read_text() == "epoch 1"


def test_the_crash_hook_fires_only_at_its_point_and_path(tmp_path, monkeypatch):
    kills: list[int] = []
    monkeypatch.setattr(io.os, "kill", lambda pid, sig: kills.append(sig))
    result = tmp_path / "cells" / "references" / "result.json"
    crash_point("write", result)
    assert kills == []  # unset: nothing
    monkeypatch.setenv(CRASH_AT_ENV, "write:references/result.json")
    for point, path in (("swap", result), ("write", tmp_path / "cells" / "ga-full" / "result.json"),
                        ("write", tmp_path / "results.json")):
        crash_point(point, path)
    assert kills == []
    crash_point("write", result)
    assert kills == [signal.SIGKILL]
    atomic_write_text(result, "{}")  # the write's own crash point, with the kill stubbed: it carries on
    assert kills == [signal.SIGKILL] * 2 and result.read_text() == "{}"
    assert [p.name for p in Path(result.parent).iterdir()] == ["result.json"]


def test_atomic_directory_gives_private_files_the_usual_mode(tmp_path):
    import stat

    with atomic_directory(tmp_path / "model") as folder:
        private = folder / "weights.bin"
        private.write_bytes(b"x")
        private.chmod(0o600)  # as a library writing through mkstemp leaves it
    mode = stat.S_IMODE((tmp_path / "model" / "weights.bin").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
