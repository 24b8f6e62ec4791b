"""Fixtures for the quantization tests: the tiny Llama loaded fresh for each test that mutates it."""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny_model(tiny_model_dir):
    from qrunlearn.models.loading import load_causal_lm

    model, _ = load_causal_lm(tiny_model_dir, device="cpu", with_tokenizer=False)
    return model


@pytest.fixture
def tiny_model_and_tokenizer(tiny_model_dir):
    from qrunlearn.models.loading import load_causal_lm

    return load_causal_lm(tiny_model_dir, device="cpu")
