"""The built-in target/retrain models: training lowers the loss, checkpoints reload and generate, cache works."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qrunlearn.cli import main
from qrunlearn.targets.build import MARKER, TargetConfig, build_target_and_retrain


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


# ---- a pretrained base, fine-tuned (`target --base`) ----------------------------------------------------------
def test_target_from_a_base_finetunes_logs_knowledge_and_caches(tiny_corpus_dir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "models"
    args = ["target", "--data", str(tiny_corpus_dir), "--out", str(out), "--base", str(tiny_model_dir),
            "--max-epochs", "2", "--lr", "3e-3", "--batch-size", "8", "--max-length", "128"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "epoch 2" in printed and "KnowMem" in printed  # every epoch's check is printed
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    for name in ("target", "retrain"):
        marker = json.loads((out / name / MARKER).read_text())
        assert marker["base"] == str(tiny_model_dir) and marker["role"] == name
        losses = marker["train"]["epoch_losses"]
        assert len(losses) == 2 and losses[1] < losses[0], losses  # the untrained base learns the corpus
        tuned = AutoModelForCausalLM.from_pretrained(out / name).state_dict()
        assert not torch.equal(tuned["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
        # the base's tokenizer is kept, not retrained
        assert AutoTokenizer.from_pretrained(out / name).get_vocab() == AutoTokenizer.from_pretrained(
            tiny_model_dir).get_vocab()
    knowledge = json.loads((out / "target" / MARKER).read_text())["knowledge"]
    assert [k["epoch"] for k in knowledge] == [1, 2]  # the 0.9 threshold is out of reach: the cap stops it
    assert all(0.0 <= k["em_forget"] <= 1.0 and 0.0 <= k["knowmem_f"] <= 100.0 for k in knowledge)

    mtime = (out / "target" / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 0
    assert "cached" in capsys.readouterr().out
    assert (out / "target" / "model.safetensors").stat().st_mtime_ns == mtime


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_base_that_is_not_a_causal_lm_is_one_line(tiny_corpus_dir, tmp_path, capsys):
    folder = tmp_path / "notamodel"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10, "hidden_size": 8,
                                                    "num_hidden_layers": 1, "num_attention_heads": 1,
                                                    "intermediate_size": 8}))
    assert main(["target", "--data", str(tiny_corpus_dir), "--out", str(tmp_path / "m"), "--base", str(folder)]) == 2
    assert str(folder) in _one_error_line(capsys)
    assert not (tmp_path / "m" / "target").exists()


def test_a_base_whose_tokenizer_cannot_encode_the_corpus_is_one_line(tiny_corpus_dir, tiny_model_dir, tmp_path,
                                                                      capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(base)
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "zzz": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(base)
    assert main(["target", "--data", str(tiny_corpus_dir), "--out", str(tmp_path / "m"), "--base", str(base)]) == 2
    assert "cannot encode this corpus" in _one_error_line(capsys)
    assert not (tmp_path / "m" / "target").exists()
