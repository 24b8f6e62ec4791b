"""End to end: metric values, batched == batch size 1, the truncation path, the output schema, errors."""

from __future__ import annotations

import json
import logging

import pytest
from pydantic import ValidationError

from qrunlearn.errors import DataError, UserError, validation_message
from qrunlearn.eval import RETRAIN_AUC_PRESETS, EvalConfig, evaluate, privleak_auc, write_eval_outputs
from qrunlearn.eval.mia import muse_auc


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from qrunlearn.models.loading import load_causal_lm

    return load_causal_lm(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def result(tiny, tiny_corpus):
    model, tokenizer = tiny
    return evaluate(model, tokenizer, tiny_corpus, EvalConfig(limit=5, batch_size=4, bootstrap=200),
                    retrain_auc=0.5, progress=False)


def test_metrics_are_consistent_with_the_item_logs(result, tiny_corpus):
    items = result.items
    for metric in ("verbmem_f", "knowmem_f", "knowmem_r"):
        scores = [i["score"] for i in items if i["metric"] == metric]
        assert len(scores) == 5
        assert result.metrics[metric] == pytest.approx(sum(scores) / 5)
        low, high = result.intervals[metric]
        assert low <= result.metrics[metric] <= high
    knowmem = [i for i in items if i["metric"] == "knowmem_f"]
    assert knowmem[0]["reference"] == tiny_corpus.knowmem["forget_qa"][0].answer
    assert knowmem[0]["prompt"].endswith(f"Question: {tiny_corpus.knowmem['forget_qa'][0].question}\nAnswer: ")
    assert knowmem[0]["prompt"].count("Question: ") == len(tiny_corpus.knowmem["forget_qa_icl"]) + 1
    assert all("\n\n" not in i["generation"] and "Question:" not in i["generation"] for i in knowmem)
    # PrivLeak from the Min-40% AUC, which is also the mia_min_k_40 AUC
    forget = [i["scores"]["min_k_40"] for i in items if i["metric"] == "privleak" and i["split"] == "forget"]
    holdout = [i["scores"]["min_k_40"] for i in items if i["metric"] == "privleak" and i["split"] == "holdout"]
    assert result.metrics["privleak_auc"] == pytest.approx(muse_auc(forget, holdout))
    assert result.metrics["mia_min_k_40"] == result.metrics["privleak_auc"]
    assert result.metrics["privleak"] == pytest.approx((result.metrics["privleak_auc"] - 0.5) / 0.5 * 100)
    for key in ("mia_loss", "mia_zlib", "mia_min_k_5", "mia_min_k_60", "mia_min_k_pp", "nll_privleak_forget",
                "nll_privleak_retain", "nll_privleak_holdout", "knowmem_f_recall", "knowmem_r_recall"):
        assert key in result.metrics
    # an untrained model: every text about as unlikely as the next (NLL near log(vocab))
    assert 4.0 < result.metrics["nll_privleak_forget"] < 9.0


def test_batched_equals_batch_size_one(tiny, tiny_corpus, result):
    model, tokenizer = tiny
    single = evaluate(model, tokenizer, tiny_corpus, EvalConfig(limit=5, batch_size=1, bootstrap=200),
                      retrain_auc=0.5, progress=False)
    for key, value in result.metrics.items():
        assert single.metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert [i.get("generation") for i in single.items] == [i.get("generation") for i in result.items]
    assert single.intervals == result.intervals  # same seed, same numbers


def test_truncation_path_warns_and_counts(tiny, tiny_corpus, caplog):
    model, tokenizer = tiny
    config = EvalConfig(metrics=("verbmem_f", "privleak"), limit=4, max_context=48, max_new_tokens_verbmem=16,
                        bootstrap=50)
    with caplog.at_level(logging.WARNING, logger="qrunlearn.eval"):
        out = evaluate(model, tokenizer, tiny_corpus, config, progress=False)
    verbmem = [i for i in out.items if i["metric"] == "verbmem_f"]
    assert all(i["prompt_tokens"] <= 32 for i in verbmem)
    assert out.settings["truncated"]["verbmem_f"] == sum(i["truncated"] for i in verbmem) > 0
    assert out.settings["truncated"]["privleak"] > 0
    assert any("verbmem_f prompts" in r.message and "truncated to 32" in r.message for r in caplog.records)
    assert out.metrics["privleak"] is None and 0.0 <= out.metrics["privleak_auc"] <= 1.0


def test_context_too_small_for_the_new_tokens_is_a_user_error(tiny, tiny_corpus):
    model, tokenizer = tiny
    with pytest.raises(UserError, match="no room"):
        evaluate(model, tokenizer, tiny_corpus, EvalConfig(metrics=("verbmem_f",), max_context=100), progress=False)


def test_privleak_auc_function_matches_evaluate(tiny, tiny_corpus, result):
    model, tokenizer = tiny
    assert privleak_auc(model, tokenizer, tiny_corpus, EvalConfig(limit=5)) == result.metrics["privleak_auc"]


def test_missing_split_names_the_file(tiny, tiny_corpus):
    from dataclasses import replace

    model, tokenizer = tiny
    corpus = replace(tiny_corpus, privleak={"forget": tiny_corpus.privleak["forget"]})
    with pytest.raises(DataError, match="privleak/holdout.json"):
        evaluate(model, tokenizer, corpus, EvalConfig(), progress=False)


def test_bad_config_values_are_rejected_naming_the_field():
    with pytest.raises(ValidationError) as info:
        EvalConfig(metrics=("verbmem",))
    assert validation_message(info.value).startswith("field 'metrics.0': Input should be 'verbmem_f'")
    with pytest.raises(ValidationError) as info:
        EvalConfig(limit=0)
    assert validation_message(info.value, option_style=True) == "--limit: Input should be greater than or equal to 1"
    assert RETRAIN_AUC_PRESETS == {"news": 0.4772, "books": 0.5393}


def test_output_schema(result, tmp_path):
    out_json, items_path = write_eval_outputs(result, tmp_path / "res.json", model_path="m", quant_spec={"q": 4})
    data = json.loads(out_json.read_text())
    for key in ("verbmem_f", "knowmem_f", "knowmem_r", "privleak", "privleak_auc"):
        assert data[key] == data["metrics"][key]
    assert set(data) >= {"metrics", "intervals", "timings", "settings", "model_path", "quant_spec", "items_file",
                         "meta"}
    assert data["quant_spec"] == {"q": 4} and data["model_path"] == "m"
    assert data["settings"]["config"]["batch_size"] == 4
    assert set(data["timings"]) == {"verbmem_f", "knowmem_f", "knowmem_r", "privleak", "total"}
    assert data["intervals"]["verbmem_f"] == list(result.intervals["verbmem_f"])
    assert data["meta"]["versions"]["torch"]
    lines = [json.loads(line) for line in items_path.read_text().splitlines()]
    assert items_path.name == "res.items.jsonl" == data["items_file"]
    assert len(lines) == 5 * 3 + 5 * 3  # verbmem, knowmem x2, privleak forget/retain/holdout
    assert {"metric", "id", "prompt", "generation", "reference", "score"} <= set(lines[0])
