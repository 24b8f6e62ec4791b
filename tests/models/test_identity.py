"""`model_identity`: a model is its weights and config, not its path; and the unlearning run key built on it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from qrunlearn.models import identity
from qrunlearn.models.identity import model_identity
from qrunlearn.unlearn import UnlearnConfig
from qrunlearn.unlearn.data import UnlearnData
from qrunlearn.unlearn.recipe import run_fingerprint


def _model_folder(folder: Path, weight: float = 0.0) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    save_file({"w": torch.full((4, 4), weight), "b": torch.zeros(4)}, str(folder / "model.safetensors"))
    return folder


def _retrain_in_place(weights: Path) -> None:
    """Give one tensor other values of the same shape, written into the same file (same path, size and inode: only
    the mtime tells), as a retrain into the same folder may. The mtime is moved on explicitly, as a file rewritten
    within one kernel clock tick may keep its mtime."""
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1.0
    before = weights.stat()
    with weights.open("r+b") as handle:
        handle.write(save(tensors, metadata=metadata))
    after = weights.stat()
    assert (after.st_size, after.st_ino) == (before.st_size, before.st_ino)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))


def test_the_identity_changes_when_the_weights_change_under_the_same_path(tmp_path):
    folder = _model_folder(tmp_path / "m")
    old = model_identity(str(folder))
    _retrain_in_place(folder / "model.safetensors")
    assert model_identity(str(folder)) != old


def test_the_same_bytes_elsewhere_are_the_same_model(tmp_path):
    folder = _model_folder(tmp_path / "m")
    copy = shutil.copytree(folder, tmp_path / "moved" / "m")
    assert model_identity(str(copy)) == model_identity(str(folder))
    assert model_identity(str(folder)).startswith("sha256:")
    assert model_identity(str(_model_folder(tmp_path / "other", weight=1.0))) != model_identity(str(folder))


def test_a_folder_holding_a_model_is_that_model_and_a_hub_id_is_itself(tmp_path):
    folder = _model_folder(tmp_path / "out" / "model")  # an `unlearn --out` folder
    assert model_identity(str(tmp_path / "out")) == model_identity(str(folder))
    assert model_identity("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_each_file_is_read_once_per_process_until_it_is_rewritten(tmp_path, monkeypatch):
    folder = _model_folder(tmp_path / "m")
    reads: list[str] = []
    file_digest = identity.hashlib.file_digest

    def counted(handle, name):
        reads.append(Path(handle.name).name)
        return file_digest(handle, name)

    monkeypatch.setattr(identity.hashlib, "file_digest", counted)
    first = model_identity(str(folder))
    assert sorted(reads) == ["config.json", "model.safetensors"]
    assert model_identity(str(folder)) == first and len(reads) == 2  # memoised
    _retrain_in_place(folder / "model.safetensors")
    assert model_identity(str(folder)) != first and reads[2:] == ["model.safetensors"]  # not stale


def test_the_run_key_changes_when_the_target_is_retrained_into_the_same_folder(tiny_model_dir, tmp_path):
    """A rerun after the target was retrained in place must neither reuse the old unlearned model nor the old
    reference NLLs; both are keyed on this fingerprint."""
    target = shutil.copytree(tiny_model_dir, tmp_path / "target")
    data, config = UnlearnData(forget=[[1, 2, 3]], retain=[[4, 5]]), UnlearnConfig()
    old = run_fingerprint(str(target), data, config)
    _retrain_in_place(target / "model.safetensors")
    assert run_fingerprint(str(target), data, config) != old
    moved = shutil.copytree(target, tmp_path / "moved")
    assert run_fingerprint(str(moved), data, config) == run_fingerprint(str(target), data, config)
