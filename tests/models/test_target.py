"""The built-in target/retrain models: training lowers the loss, checkpoints reload and generate, cache works."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qrunlearn.cli import main
from qrunlearn.models.target import MARKER, TargetConfig, build_target_and_retrain


def test_target_and_retrain_train_reload_generate_and_cache(tiny_corpus_dir, tmp_path, capsys):
    out = tmp_path / "models"
    config = TargetConfig(size="tiny", epochs=8, seed=0)
    result = build_target_and_retrain(tiny_corpus_dir, out, config, progress=False)
    for name in ("target", "retrain"):
        losses = result[name].train["epoch_losses"]
        assert result[name].status == "trained"
        assert losses[-1] < 0.8 * losses[0], losses
        marker = json.loads((out / name / MARKER).read_text())
        assert marker["seed"] == 0 and marker["versions"]["torch"] and marker["config"]["size"] == "tiny"

    model = AutoModelForCausalLM.from_pretrained(out / "target")
    tokenizer = AutoTokenizer.from_pretrained(out / "target")
    batch = tokenizer(["Question: What"], return_tensors="pt")
    generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 5
    assert isinstance(tokenizer.decode(generated[0]), str)

    mtime = (out / "target" / "model.safetensors").stat().st_mtime_ns
    assert main(["target", "--data", str(tiny_corpus_dir), "--out", str(out), "--size", "tiny", "--epochs", "8"]) == 0
    assert "cached" in capsys.readouterr().out
    assert (out / "target" / "model.safetensors").stat().st_mtime_ns == mtime


def test_same_seed_same_weights(tiny_corpus_dir, tmp_path):
    config = TargetConfig(size="tiny", epochs=1, seed=5)
    a = build_target_and_retrain(tiny_corpus_dir, tmp_path / "a", config, progress=False)
    b = build_target_and_retrain(tiny_corpus_dir, tmp_path / "b", config, progress=False)
    wa = AutoModelForCausalLM.from_pretrained(a["retrain"].path).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b["retrain"].path).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
