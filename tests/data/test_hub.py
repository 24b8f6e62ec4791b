"""Hub export: a MUSE dataset's configs/splits become the on-disk layout (the hub client is replaced by a fake,
since tests have no network), and an unreachable hub is one line."""

from __future__ import annotations

import pytest

from qrunlearn.data import hub
from qrunlearn.errors import UserError


def _fake_rows(config: str, split: str) -> list[dict]:
    if config in ("raw", "privleak"):
        return [{"text": f"{config} {split} document {i}"} for i in range(3)]
    if config == "verbmem":
        return [{"prompt": f"prompt {i} ", "gt": f"continuation {i}"} for i in range(2)]
    return [{"question": f"{split} question {i}?", "answer": f"answer {i}"} for i in range(10 if "icl" in split else 4)]


def test_export_writes_muse_layout(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(dataset_id, config, split):
        calls.append((dataset_id, config, split))
        return _fake_rows(config, split)

    monkeypatch.setattr(hub, "load_dataset", fake_load_dataset)
    corpus = hub.export_hub_corpus("muse-bench/MUSE-News", tmp_path / "news")
    assert len(calls) == 4 + 1 + 4 + 3 and all(c[0] == "muse-bench/MUSE-News" for c in calls)
    assert (tmp_path / "news" / "raw" / "retain2.json").is_file()
    assert corpus.raw["holdout"][2] == "raw holdout document 2"
    assert corpus.verbmem[1].gt == "continuation 1"
    assert len(corpus.knowmem["forget_qa_icl"]) == 10 and corpus.knowmem["retain_qa"][0].answer == "answer 0"
    assert corpus.privleak["retain"][0] == "privleak retain document 0"


def test_unreachable_hub_is_one_line(tmp_path, monkeypatch):
    def offline(*_args, **_kwargs):
        raise ConnectionError("Couldn't reach 'muse-bench/MUSE-News' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(hub, "load_dataset", offline)
    with pytest.raises(UserError) as info:
        hub.export_hub_corpus("muse-bench/MUSE-News", tmp_path / "news")
    message = str(info.value)
    assert "cannot load config 'raw' split 'forget'" in message and "\n" not in message
    assert not (tmp_path / "news").exists()
