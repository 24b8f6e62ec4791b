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


@pytest.fixture
def audit_a_copy(tiny_model_dir, tiny_corpus_dir, tmp_path, capsys):
    """Runs `qrunlearn audit` of the tiny model against a copy scaled by 1.001 (so its content identity differs,
    and nothing was forgotten: exit 1, "no measurable forgetting") at the given formats, twice into one folder;
    returns the two audit.json payloads."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from qrunlearn.cli import main

    def run(formats: str) -> tuple[dict, dict]:
        unlearned = tmp_path / "unlearned"
        shutil.copytree(tiny_model_dir, unlearned)
        weights = load_file(str(unlearned / "model.safetensors"))
        save_file({k: v * 1.001 for k, v in weights.items()}, str(unlearned / "model.safetensors"))
        args = ["audit", "--target", str(tiny_model_dir), "--unlearned", str(unlearned), "--data",
                str(tiny_corpus_dir), "--out", str(tmp_path / "out"), "--formats", formats, "--limit", "4",
                "--metrics", "knowmem_f,knowmem_r", "--bootstrap", "50", "--no-progress"]
        payloads = []
        for _ in range(2):
            assert main(args) == 1
            payloads.append(json.loads((tmp_path / "out" / "audit.json").read_text()))
        capsys.readouterr()
        return payloads[0], payloads[1]

    return run
