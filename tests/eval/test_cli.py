"""`qrunlearn eval`: a real run (MUSE-News files, --limit 3), and one-line errors with exit code 2."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from qrunlearn.cli import main


def test_eval_on_real_muse_news_with_limit(tiny_model_dir, muse_news_dir, tmp_path, capsys):
    out = tmp_path / "news.json"
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(muse_news_dir), "--out", str(out),
                 "--retrain-auc", "news", "--limit", "3", "--batch-size", "3", "--bootstrap", "100"])
    assert code == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["settings"]["retrain_auc"] == 0.4772
    assert data["settings"]["n_items"] == {"verbmem_f": 3, "knowmem_f": 3, "knowmem_r": 3, "privleak_forget": 3,
                                           "privleak_retain": 3, "privleak_holdout": 3}
    # MUSE-News verbmem prompts are ~1000 tokens: the 512-position tiny model must left-truncate them
    assert data["settings"]["truncated"]["verbmem_f"] == 3
    assert data["privleak"] == pytest.approx((data["privleak_auc"] - 0.4772) / 0.4772 * 100)
    assert 0.0 <= data["verbmem_f"] <= 100.0
    assert (tmp_path / "news.items.jsonl").exists()
    assert "verbmem_f" in capsys.readouterr().out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_not_a_causal_lm(tiny_corpus_dir, tmp_path, capsys):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    code = main(["eval", "--model", str(folder), "--data", str(tiny_corpus_dir), "--out", str(tmp_path / "r.json")])
    assert code == 2
    assert "not a causal LM" in _error_line(capsys)
    assert not (tmp_path / "r.json").exists()


def test_missing_tokenizer(tiny_model_dir, tiny_corpus_dir, tmp_path, capsys):
    folder = tmp_path / "no_tok"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, folder / name)
    code = main(["eval", "--model", str(folder), "--data", str(tiny_corpus_dir), "--out", str(tmp_path / "r.json")])
    assert code == 2
    assert "missing tokenizer" in _error_line(capsys)


def test_data_lacking_a_needed_split(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    from qrunlearn.data.muse import write_corpus

    data = write_corpus(replace(tiny_corpus, privleak={"forget": tiny_corpus.privleak["forget"]}), tmp_path / "d")
    args = ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "r.json")]
    assert main(args) == 2
    line = _error_line(capsys)
    assert "privleak/holdout.json" in line and "missing" in line
    # without privleak among the metrics the same folder is fine for the other metrics' checks
    assert main(args + ["--metrics", "knowmem_f", "--limit", "2", "--bootstrap", "10"]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--retrain-auc", "nope"], "--retrain-auc"),
    (["--retrain-auc", "news", "--retrain", "x"], "not both"),
    (["--metrics", "verbmem_f,bogus"], "--metrics"),
    (["--knowmem-prompt", "spaced"], "--knowmem-prompt"),
])
def test_bad_options(tiny_model_dir, tiny_corpus_dir, tmp_path, capsys, extra, message):
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(tiny_corpus_dir),
                 "--out", str(tmp_path / "r.json"), *extra])
    assert code == 2
    assert message in _error_line(capsys)


def test_retrain_model_gives_the_reference_auc(tiny_model_dir, tiny_corpus_dir, tmp_path, capsys):
    # the same model as its own retrain reference: PrivLeak is exactly 0
    out = tmp_path / "self.json"
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(tiny_corpus_dir), "--out", str(out),
                 "--retrain", str(tiny_model_dir), "--metrics", "privleak", "--limit", "6", "--bootstrap", "50"])
    assert code == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["settings"]["retrain_auc"] == data["privleak_auc"]
    assert data["privleak"] == 0.0
    assert data["retrain"] == str(tiny_model_dir)


def test_every_eval_setting_is_an_option(tiny_model_dir, tiny_corpus_dir, tmp_path, capsys):
    """The grid's evaluation settings (e.g. the answer-space KnowMem prompt of the SmolLM2 configs) can be given to
    `qrunlearn eval` too, and land in the results' settings; help keeps the descriptions' capitals."""
    out = tmp_path / "r.json"
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(tiny_corpus_dir), "--out", str(out),
                 "--metrics", "knowmem_f", "--limit", "2", "--bootstrap", "10", "--knowmem-prompt", "answer-space",
                 "--no-answer-nll", "--max-new-tokens-knowmem", "8", "--no-cpu-kernels"])
    assert code == 0, capsys.readouterr().err
    config = json.loads(out.read_text())["settings"]["config"]
    assert config["knowmem_prompt"] == "answer-space" and config["answer_nll"] is False
    assert config["max_new_tokens_knowmem"] == 8 and config["cpu_kernels"] is False
    capsys.readouterr()
    assert main(["eval", "--help"]) == 0
    assert "LOSS" in capsys.readouterr().out  # --mia: "Also the LOSS / zlib / Min-K ..." (capitalize() lowered it)


def test_the_eval_command_imports_only_what_it_uses():
    """`qrunlearn eval`'s modules load without scikit-learn and nltk (MUSE's AUC and ROUGE-L are computed here)
    and without hqq and torchao (transformers imports them for features qrunlearn does not use): seconds of every
    command's start (benchmarks/bench_startup.py)."""
    import subprocess
    import sys

    probe = ("import sys\nfrom qrunlearn.cli import eval_run\neval_run.eval_folder\n"
             "print(sorted(m for m in ('sklearn', 'nltk', 'rouge_score', 'hqq', 'torchao') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert done.stderr == ""  # and no import prints a warning


def test_the_installed_script_quantizes_with_hqq_and_evaluates_the_folder(tiny_model_dir, tiny_corpus_dir, tmp_path):
    """The command line loads transformers with hqq reported absent; the `hqq:` quantizer still works, through
    the installed console script, and its folder evaluates quantized."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("hqq")
    script = Path(sys.executable).with_name("qrunlearn")
    quantized, out = tmp_path / "q", tmp_path / "r.json"
    for args in (["quantize", "--model", str(tiny_model_dir), "--method", "hqq:w4g32", "--out", str(quantized)],
                 ["eval", "--model", str(quantized), "--data", str(tiny_corpus_dir), "--out", str(out),
                  "--metrics", "knowmem_f", "--limit", "2", "--bootstrap", "10"]):
        done = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(out.read_text())["quant_spec"] == "hqq:w4g32"
