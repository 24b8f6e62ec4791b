"""The relearning probe's split (disjoint by subject; a corpus without subjects falls back and says so) and its
step budget."""

from __future__ import annotations

import copy

import torch

from qrunlearn.data.muse import QAPair
from qrunlearn.eval.relearn import probe_corpus, relearn, relearning_split
from qrunlearn.models.loading import load_causal_lm


def test_the_split_is_disjoint_by_subject(tiny_corpus):
    split = relearning_split(tiny_corpus, seed=0)
    assert split.by_subject and split.relearn_subjects and split.probe_subjects
    assert not set(split.relearn_subjects) & set(split.probe_subjects)
    # no probed subject is named in any relearning document; every probed question is about a probed subject
    assert not any(s in doc for doc in split.relearn_documents for s in split.probe_subjects)
    assert all(q.subject in split.probe_subjects for q in split.probe_questions)
    asked = tiny_corpus.knowmem["forget_qa"]
    assert 0 < len(split.probe_questions) < len(asked)
    assert set(split.probe_subjects) == {q.subject for q in split.probe_questions}
    # another seed, another split; the same seed, the same split
    assert relearning_split(tiny_corpus, seed=0) == split
    assert relearning_split(tiny_corpus, seed=1).probe_subjects != split.probe_subjects
    probed = probe_corpus(tiny_corpus, split)
    assert probed.knowmem["forget_qa"] == split.probe_questions
    assert probed.knowmem["forget_qa_icl"] == tiny_corpus.knowmem["forget_qa_icl"]
    assert tiny_corpus.knowmem["forget_qa"] == asked  # the corpus itself is untouched


def test_without_subjects_it_falls_back_and_says_so(tiny_corpus):
    bare = copy.copy(tiny_corpus)
    bare.knowmem = {**tiny_corpus.knowmem,
                    "forget_qa": [QAPair(q.question, q.answer) for q in tiny_corpus.knowmem["forget_qa"]]}
    split = relearning_split(bare, seed=0)
    assert not split.by_subject and split.probe_questions == bare.knowmem["forget_qa"]
    documents = [d for d in bare.raw["forget"] if d.strip()]
    assert len(split.relearn_documents) == len(documents) // 2


def test_relearning_takes_exactly_its_steps(tiny_model_dir, tiny_corpus):
    model, tokenizer = load_causal_lm(tiny_model_dir)
    before = [p.detach().clone() for p in model.parameters()]
    result = relearn(model, tokenizer, relearning_split(tiny_corpus), steps=5, lr=1e-3, batch_size=2)
    assert result.steps == 5
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
