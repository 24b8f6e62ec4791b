"""Generic model loading: safe defaults and one-line errors for folders that are not causal LMs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qrunlearn.errors import UserError
from qrunlearn.models.loading import load_causal_lm


def test_loads_fp32_with_left_padding_and_pad_token(tiny_model_dir):
    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token_id is not None and tokenizer.padding_side == "left"
    assert tokenizer("Hello")["input_ids"][0] == tokenizer.bos_token_id
    assert not model.training


def test_not_a_causal_lm(tiny_model_dir, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(tiny_model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="not a causal LM"):
        load_causal_lm(bad)


def test_missing_weights_and_missing_tokenizer(tiny_model_dir, tmp_path):
    only_config = tmp_path / "c"
    only_config.mkdir()
    shutil.copy(tiny_model_dir / "config.json", only_config)
    with pytest.raises(UserError, match="no \\*.safetensors weights"):
        load_causal_lm(only_config)
    no_tok = tmp_path / "n"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, no_tok)
    with pytest.raises(UserError, match="missing tokenizer"):
        load_causal_lm(no_tok)


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="model folder not found"):
        load_causal_lm(tmp_path / "absent" / "model")
