"""`resolve_model_path`: the model inside a folder another qrunlearn command wrote, or one line saying where it
looked; `resolve_tokenizer_path`: a tokenizer-only folder as it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from qrunlearn.errors import UserError
from qrunlearn.models.source import ModelSource, resolve_model_path, resolve_tokenizer_path


def _model_at(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_a_model_folder_is_itself(tmp_path):
    assert resolve_model_path(_model_at(tmp_path / "m")) == tmp_path / "m"
    assert resolve_model_path(str(tmp_path / "m")) == tmp_path / "m"


def test_an_unlearn_out_folder_resolves_to_its_model(tmp_path):
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
    for looked in ("empty/config.json", "empty/model/config.json", "empty/unlearn/model/config.json"):
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
