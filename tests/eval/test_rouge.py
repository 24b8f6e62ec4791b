"""ROUGE-L as MUSE computes it, the KnowMem stop-string cut, and MUSE's decode clean-up."""

from __future__ import annotations

import random

import pytest

from qrunlearn.eval.rouge import clean_up_tokenization, contains_stop_string, cut_at_stop_strings, rouge_l


def test_rouge_l_hand_computed():
    # reference 6 tokens, generation 5; LCS = "the cat on mat" (4 tokens)
    score = rouge_l("The cat sat on the mat.", "the cat on a mat")
    assert score.precision == pytest.approx(4 / 5)
    assert score.recall == pytest.approx(4 / 6)
    assert score.f1 == pytest.approx(2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6))  # 0.72727...


def test_rouge_l_no_stemming_and_case_insensitive():
    # with a stemmer "running" and "runs" would both become "run"; MUSE scores without one
    assert rouge_l("running", "runs").f1 == 0.0
    assert rouge_l("Paris", "paris").f1 == 1.0


def test_rouge_l_empty_generation_scores_zero():
    assert rouge_l("Drudrendstead", "").f1 == 0.0


@pytest.mark.parametrize("raw, expected", [
    ("Drudrendstead\n\nQuestion: who?", "Drudrendstead"),
    ("Drudrendstead\nQuestion: who?", "Drudrendstead"),
    ("Drudrendstead Question: who", "Drudrendstead "),
    ("1998\nAnswer: 1999", "1998\nAnswer: 1999"),  # a single newline is not a stop
    ("no stop here", "no stop here"),
    ("\n\nleading stop", ""),
])
def test_cut_at_stop_strings(raw, expected):
    assert cut_at_stop_strings(raw) == expected
    assert contains_stop_string(raw) == (raw != expected or "Question:" in raw)


def test_cut_takes_the_earliest_stop_whatever_the_list_order():
    text = "a Question: b\n\nc"
    assert cut_at_stop_strings(text) == "a "
    assert cut_at_stop_strings(text, ("Question:", "\n\n")) == "a "


def test_clean_up_tokenization_matches_transformers4():
    assert clean_up_tokenization("He said , it is n't so . Right ?") == "He said, it isn't so. Right?"


def test_rouge_l_equals_the_rouge_score_package_to_the_bit():
    """MUSE's scorer, `RougeScorer(["rougeL"], use_stemmer=False).score(reference, generation)`, on generated
    text with case, punctuation, digits, non-ASCII letters, repeats and empty sides."""
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    words = ["the", "The", "Mayor", "of", "Veldria", "42", "café", "x-ray", "it's", "", "!!", "U.S.", "naïve", "a"]
    pairs = [("", "anything"), ("anything", ""), ("...", "!!")]
    for _ in range(300):
        pairs.append((" ".join(rng.choices(words, k=rng.randint(0, 40))),
                      " ".join(rng.choices(words, k=rng.randint(0, 40)))))
    for reference, generation in pairs:
        expected = scorer.score(reference, generation)["rougeL"]
        ours = rouge_l(reference, generation)
        assert (ours.f1, ours.precision, ours.recall) == (expected.fmeasure, expected.precision, expected.recall), (
            reference, generation)
