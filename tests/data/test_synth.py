"""The built-in benchmark: deterministic bytes, disjoint entities, every answer stated in its split."""

from __future__ import annotations

import filecmp
import re

from qrunlearn.cli import main
from qrunlearn.data.muse import load_corpus
from qrunlearn.data.synth import SynthConfig, generate_corpus


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*.json"))


def test_same_seed_byte_identical(tmp_path):
    for name in ("a", "b"):
        assert main(["data", "synth", "--out", str(tmp_path / name), "--seed", "3", "--size", "tiny"]) == 0
    files = _files(tmp_path / "a")
    assert files == _files(tmp_path / "b") and len(files) == 12
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", [str(f) for f in files], shallow=False)
    assert not mismatch and not errors and len(match) == 12
    assert main(["data", "synth", "--out", str(tmp_path / "c"), "--seed", "4", "--size", "tiny"]) == 0
    first, other = (tmp_path / name / "raw" / "forget.json" for name in ("a", "c"))
    assert first.read_bytes() != other.read_bytes()


def test_full_muse_layout_and_counts(tmp_path):
    main(["data", "synth", "--out", str(tmp_path), "--size", "small"])
    corpus = load_corpus(tmp_path)
    counts = corpus.summary()
    # 16 people per split, 2 articles each; forget/retain1 add 2 x ceil(80 / 11) = 16 QA digests
    assert counts["raw/forget"] == 48 and counts["raw/retain1"] == 48 and counts["raw/holdout"] == 32
    assert counts["verbmem/forget"] == 32
    assert counts["knowmem/forget_qa"] == 70 and counts["knowmem/forget_qa_icl"] == 10
    assert counts["privleak/forget"] == counts["privleak/holdout"] == counts["privleak/retain"] == 32


def _names(docs):
    return set(re.findall(r"Profile: (\w+ \w+) of", " ".join(docs)))


def test_splits_are_disjoint_and_answers_are_stated():
    corpus = generate_corpus(SynthConfig(seed=1, size="small"))
    forget, retain, holdout = (_names(corpus.raw[s]) for s in ("forget", "retain1", "holdout"))
    assert len(forget) == 16 and len(retain) == 16 and len(holdout) == 16
    assert not (forget & retain) and not (forget & holdout) and not (retain & holdout)
    articles = {s: " ".join(d for d in corpus.raw[s] if not d.startswith("Question: ")) for s in corpus.raw}
    for split, qa_names in (("forget", ("forget_qa", "forget_qa_icl")), ("retain1", ("retain_qa", "retain_qa_icl"))):
        for name in qa_names:
            for pair in corpus.knowmem[name]:
                assert pair.answer in articles[split], (name, pair)
    # forget facts are not stated in the retain or holdout articles
    for pair in corpus.knowmem["forget_qa"]:
        if not pair.answer.isdigit() and pair.answer[0].isupper():
            assert pair.answer not in articles["retain1"] and pair.answer not in articles["holdout"]


def test_verbmem_is_prompt_plus_continuation_of_forget_articles():
    corpus = generate_corpus(SynthConfig(seed=0, size="tiny"))
    forget_docs = set(corpus.raw["forget"])
    for item in corpus.verbmem:
        assert item.prompt + item.gt in forget_docs
        assert len(item.gt) > len(item.prompt)
