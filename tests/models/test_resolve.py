"""`resolve_model_path`: the model inside a folder another qrunlearn command wrote (the one its pointer names, or in
an older folder without one where older versions put it), or one line saying where it looked;
`resolve_tokenizer_path`: a tokenizer-only folder as it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qrunlearn.errors import UserError
from qrunlearn.models.source import (
    MODEL_POINTER,
    ModelSource,
    resolve_model_path,
    resolve_tokenizer_path,
    write_model_pointer,
)


def _model_at(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_a_model_folder_is_itself(tmp_path):
    assert resolve_model_path(_model_at(tmp_path / "m")) == tmp_path / "m"
    assert resolve_model_path(str(tmp_path / "m")) == tmp_path / "m"


def test_a_pointer_names_the_model_relative_to_its_folder(tmp_path):
    folder = tmp_path / "cell"
    model = _model_at(folder / "unlearn" / "epochs" / "epoch_002")
    _model_at(folder / "unlearn" / "model")  # where the legacy fallback would look: the pointer wins
    pointer = write_model_pointer(folder, model)
    assert json.loads(pointer.read_text()) == {"model": "unlearn/epochs/epoch_002"}
    assert resolve_model_path(folder) == model
    shutil.move(folder, tmp_path / "moved")  # relative: the folder can move with its model
    assert resolve_model_path(tmp_path / "moved") == tmp_path / "moved" / "unlearn" / "epochs" / "epoch_002"


def test_an_unchanged_pointer_is_not_rewritten(tmp_path, monkeypatch):
    """A resumed run leaves the files it finished untouched, its pointer too."""
    import qrunlearn.io

    pointer = write_model_pointer(tmp_path, _model_at(tmp_path / "model"))
    real_write = qrunlearn.io.atomic_write_json
    writes = []
    monkeypatch.setattr(qrunlearn.io, "atomic_write_json", lambda *args: writes.append(args) or real_write(*args))
    write_model_pointer(tmp_path, tmp_path / "model")
    assert writes == []
    write_model_pointer(tmp_path, _model_at(tmp_path / "other"))
    assert len(writes) == 1 and json.loads(pointer.read_text()) == {"model": "other"}


@pytest.mark.parametrize(("text", "expected"), [
    ("{", "invalid JSON"),
    ('["model"]', "expected a JSON object, got list"),
    ("{}", "field 'model': expected the model folder's path, as a string"),
    ('{"model": 3}', "field 'model': expected the model folder's path, as a string"),
    ('{"model": "gone"}', "field 'model': "),
    ('{"model": "empty"}', "empty is not a model folder (no config.json)"),
])
def test_a_bad_pointer_is_one_line_naming_it(tmp_path, text, expected):
    folder = tmp_path / "out"
    (folder / "empty").mkdir(parents=True)
    _model_at(folder / "model")  # a legacy location holding a model does not hide a broken pointer
    (folder / MODEL_POINTER).write_text(text)
    with pytest.raises(UserError) as caught:
        resolve_model_path(folder)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{folder / MODEL_POINTER}: ") and expected in message


def test_an_unlearn_out_folder_resolves_to_its_model(tmp_path):
    """A folder written before pointers existed: read from the legacy locations."""
    _model_at(tmp_path / "out" / "model")
    (tmp_path / "out" / "adapter").mkdir()
    assert resolve_model_path(tmp_path / "out") == tmp_path / "out" / "model"


def test_a_run_cell_folder_resolves_to_its_unlearned_model(tmp_path):
    cell = tmp_path / "cells" / "ga_gdr-full"
    _model_at(cell / "unlearn" / "model")
    assert resolve_model_path(cell) == cell / "unlearn" / "model"


def test_the_folder_itself_wins_over_a_nested_model(tmp_path):
    outer = _model_at(tmp_path / "m")
    _model_at(outer / "model")
    assert resolve_model_path(outer) == outer


def test_a_folder_without_a_model_lists_where_it_looked(tmp_path):
    (tmp_path / "empty" / "model").mkdir(parents=True)  # a model/ folder without config.json is not a model
    with pytest.raises(UserError) as caught:
        resolve_model_path(tmp_path / "empty")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'empty'}: no model found")
    for looked in ("empty/config.json", f"empty/{MODEL_POINTER}", "empty/model/config.json",
                   "empty/unlearn/model/config.json"):
        assert str(tmp_path / looked) in message


def test_a_missing_path_or_hub_id_is_left_to_the_loader(tmp_path):
    assert resolve_model_path("org/model-name") == Path("org/model-name")
    assert resolve_model_path(tmp_path / "absent") == tmp_path / "absent"


def test_model_source_checks_the_resolved_folder(tmp_path):
    _model_at(tmp_path / "out" / "model")
    with pytest.raises(UserError, match=r"out/model: no \*\.safetensors weights"):
        ModelSource(str(tmp_path / "out")).check()
    with pytest.raises(UserError, match=r"out/model: missing tokenizer"):
        ModelSource(str(tmp_path / "out")).check_tokenizer()


def test_a_tokenizer_only_folder_is_a_tokenizer_folder(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}")
    assert resolve_tokenizer_path(tmp_path / "tokenizer") == tmp_path / "tokenizer"
    ModelSource(str(tmp_path / "tokenizer")).check_tokenizer()
    _model_at(tmp_path / "out" / "model")
    (tmp_path / "out" / "model" / "tokenizer_config.json").write_text("{}")
    assert resolve_tokenizer_path(tmp_path / "out") == tmp_path / "out" / "model"
