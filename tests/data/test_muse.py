"""The MUSE loader/validator: every bad-input case names file, item and field; good folders round-trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qrunlearn.cli import main
from qrunlearn.data.muse import load_corpus, write_corpus
from qrunlearn.errors import DataError


def _write(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


@pytest.fixture()
def corpus_copy(tiny_corpus_dir, tmp_path) -> Path:
    dst = tmp_path / "corpus"
    shutil.copytree(tiny_corpus_dir, dst)
    return dst


@pytest.mark.parametrize(
    ("rel", "value", "expected"),
    [
        ("knowmem/forget_qa.json", {"question": "q", "answer": "a"}, "expected a JSON list, got dict"),
        ("knowmem/forget_qa.json", [], "empty list"),
        ("knowmem/forget_qa.json", [{"question": "q", "answer": "a"}, {"question": "q2"}],
         "item 1: field 'answer': missing key"),
        ("knowmem/retain_qa.json", [{"question": 3, "answer": "a"}],
         "item 0: field 'question': expected a string, got int"),
        ("verbmem/forget.json", [{"prompt": "p", "gt": "g"}, "oops"], "item 1: expected an object"),
        ("verbmem/forget.json", [{"prompt": "p", "gt": None}], "item 0: field 'gt': expected a string, got NoneType"),
        ("privleak/holdout.json", ["ok", 7], "item 1: expected a string, got int"),
        ("raw/forget.json", ["doc", ""], "item 1: empty string"),
    ],
)
def test_bad_input_names_file_item_field(corpus_copy, rel, value, expected):
    _write(corpus_copy / rel, value)
    with pytest.raises(DataError) as info:
        load_corpus(corpus_copy)
    message = str(info.value)
    assert message.startswith(str(corpus_copy / rel))
    assert expected in message
    assert "\n" not in message


def test_invalid_json_reports_line(corpus_copy):
    (corpus_copy / "privleak" / "forget.json").write_text('["a",\n  "b",,]')
    with pytest.raises(DataError, match=r"privleak/forget.json: invalid JSON at line 2"):
        load_corpus(corpus_copy)


def test_missing_icl_file_is_named(corpus_copy):
    (corpus_copy / "knowmem" / "forget_qa_icl.json").unlink()
    with pytest.raises(DataError, match=r"knowmem/forget_qa_icl.json: missing"):
        load_corpus(corpus_copy)


def test_missing_verbmem_file_is_named(corpus_copy):
    (corpus_copy / "verbmem" / "forget.json").unlink()
    with pytest.raises(DataError, match=r"verbmem/forget.json: missing"):
        load_corpus(corpus_copy)


def test_require_names_missing_split(corpus_copy):
    (corpus_copy / "raw" / "retain2.json").unlink()
    corpus = load_corpus(corpus_copy)
    with pytest.raises(DataError, match=r"raw/retain2.json: missing"):
        corpus.require_raw("retain2")


def test_not_a_corpus(tmp_path):
    with pytest.raises(DataError, match="no MUSE folders found"):
        load_corpus(tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        load_corpus(tmp_path / "nope")


def test_cli_bad_input_one_line_exit_2(corpus_copy, capsys):
    _write(corpus_copy / "knowmem" / "retain_qa.json", [{"question": "q", "answer": ["a"]}])
    code = main(["data", "check", str(corpus_copy)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("error: ") and "retain_qa.json: item 0: field 'answer'" in err
    assert "Traceback" not in err


def test_cli_check_prints_counts(tiny_corpus_dir, capsys):
    assert main(["data", "check", str(tiny_corpus_dir)]) == 0
    out = capsys.readouterr().out
    assert "knowmem/forget_qa (question)" in out and "ok:" in out


def test_round_trip(tiny_corpus, tmp_path):
    write_corpus(tiny_corpus, tmp_path / "again")
    again = load_corpus(tmp_path / "again")
    assert again.raw == tiny_corpus.raw
    assert again.verbmem == tiny_corpus.verbmem
    assert again.knowmem == tiny_corpus.knowmem
    assert again.privleak == tiny_corpus.privleak


def test_txt_raw_split_is_one_document(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "forget.txt").write_text("line one\nline two\n")
    corpus = load_corpus(tmp_path)
    assert corpus.raw["forget"] == ["line one\nline two\n"]


def test_real_muse_news_loads(muse_news_dir):
    corpus = load_corpus(muse_news_dir)
    counts = corpus.summary()
    assert counts["verbmem/forget"] == 100
    assert counts["knowmem/forget_qa"] == 100 and counts["knowmem/retain_qa"] == 100
    assert counts["knowmem/forget_qa_icl"] == 10 and counts["knowmem/retain_qa_icl"] == 10
    assert counts["privleak/forget"] == counts["privleak/holdout"] == counts["privleak/retain"] == 100
    assert len(corpus.raw["forget"][0]) > 1_000_000  # raw/forget.txt read whole
    assert min(len(t) for t in corpus.privleak["forget"]) > 5000


def _forget_documents(corpus_copy: Path) -> list[str]:
    return json.loads((corpus_copy / "raw" / "forget.json").read_text())


def test_json_and_txt_with_the_same_text_load_the_json(corpus_copy, capsys):
    documents = _forget_documents(corpus_copy)
    # raw/forget.txt beside raw/forget.json, as MUSE ships them: the .txt joins the documents with blank lines and
    # breaks lines elsewhere, so only the text without whitespace is the same
    (corpus_copy / "raw" / "forget.txt").write_text("\n\n".join(d.replace(" ", "\n", 1) for d in documents) + "\n")
    corpus = load_corpus(corpus_copy)
    assert corpus.raw["forget"] == documents and len(documents) > 1  # document boundaries kept
    assert corpus.sources["raw/forget"].path == corpus_copy / "raw" / "forget.json"
    assert corpus.sources["raw/forget"].same_text_as == corpus_copy / "raw" / "forget.txt"
    assert corpus.sources["raw/retain1"].same_text_as is None
    assert main(["data", "check", str(corpus_copy)]) == 0
    out = capsys.readouterr().out
    assert "raw/forget: read raw/forget.json (raw/forget.txt holds the same text" in out
    assert "raw/retain1: read raw/retain1.json\n" in out


def test_json_and_txt_that_differ_name_both_files(corpus_copy, capsys):
    documents = _forget_documents(corpus_copy)
    changed = documents[-1][:-1] + ("X" if documents[-1][-1] != "X" else "Y")  # one character of the last document
    (corpus_copy / "raw" / "forget.txt").write_text("\n\n".join([*documents[:-1], changed]))
    with pytest.raises(DataError) as info:
        load_corpus(corpus_copy)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{corpus_copy / 'raw' / 'forget.json'}: holds different text from "
                              f"{corpus_copy / 'raw' / 'forget.txt'}")
    assert main(["data", "check", str(corpus_copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "forget.json" in err and "forget.txt" in err


def test_extra_splits_with_both_files_load_once(corpus_copy):
    _write(corpus_copy / "scal" / "forget_1.json", ["first doc", "second doc"])
    (corpus_copy / "scal" / "forget_1.txt").write_text("first doc\nsecond doc\n")
    (corpus_copy / "scal" / "forget_2.txt").write_text("only a text file")
    corpus = load_corpus(corpus_copy)
    assert corpus.extra == {"scal/forget_1": ["first doc", "second doc"], "scal/forget_2": ["only a text file"]}
    assert corpus.sources["scal/forget_2"].path.name == "forget_2.txt"
