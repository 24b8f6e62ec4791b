"""Shared fixtures: a tiny synthetic corpus and a tiny (random-init) Llama with a tokenizer trained on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

SHARED_MUSE_NEWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "muse-news"


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory) -> Path:
    from qrunlearn.data.muse import write_corpus
    from qrunlearn.data.synth import SynthConfig, generate_corpus

    out = tmp_path_factory.mktemp("synth_tiny")
    write_corpus(generate_corpus(SynthConfig(seed=0, size="tiny")), out)
    return out


@pytest.fixture(scope="session")
def tiny_corpus(tiny_corpus_dir):
    from qrunlearn.data.muse import load_corpus

    return load_corpus(tiny_corpus_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_corpus) -> Path:
    """An untrained 'tiny' preset Llama (hidden 64, 2 layers) saved as a standard HF folder."""
    from qrunlearn.models.tiny import PRESETS, build_model, train_tokenizer

    out = tmp_path_factory.mktemp("tiny_model")
    texts = [t for docs in tiny_corpus.raw.values() for t in docs]
    tokenizer = train_tokenizer(texts, vocab_size=PRESETS["tiny"].vocab_target, out_dir=out)
    model = build_model(PRESETS["tiny"], len(tokenizer), tokenizer, seed=0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def muse_news_dir() -> Path:
    if not SHARED_MUSE_NEWS.is_dir():
        pytest.skip(f"real MUSE-News files not present at {SHARED_MUSE_NEWS}")
    return SHARED_MUSE_NEWS
