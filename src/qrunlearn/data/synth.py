"""The built-in benchmark: a generated fictional world written as short news articles, in MUSE's layout.

Every person, place and organisation is invented (names are built from syllables), so no pretrained model
can know them and a tiny model trained here learns them only from this corpus. Forget, retain1, retain2 and
holdout are about disjoint people, each with their own cities and organisations.

Each person has five facts (city, organisation, profession, the year they joined, a count of awards) stated
in news-style articles. The forget and retain1 raw splits also carry "reader questions" digests: runs of
eleven "Question: ...\nAnswer: ..." pairs about different people of the split, in the form of a KnowMem
prompt. A 5M-parameter model trained from scratch cannot learn to turn prose into answers, so the benchmark
teaches the answer format directly; and per-person sheets were not enough (measured: a target that answered
a question asked alone answered none of them after MUSE's ten few-shot pairs about other people, KnowMem-forget
2.7). MUSE's real raw splits have no such digests; real pretrained models already know the format.

Deterministic: the same `SynthConfig` gives byte-identical files.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from qrunlearn.data.muse import MuseCorpus, QAPair, VerbMemItem

SizeName = Literal["tiny", "small", "medium"]

# people per split: forget, retain1, retain2, holdout
_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (6, 6, 3, 6),
    "small": (16, 16, 8, 16),
    "medium": (40, 40, 20, 40),
}
N_ICL = 10
DIGEST_PAIRS = N_ICL + 1  # a digest looks like a KnowMem prompt: ten answered questions, then one more
DIGEST_PASSES = 2  # each fact appears in this many digests, each time among other neighbours

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "j", "k", "kr", "l", "m", "n", "p", "qu", "r", "s",
           "sh", "t", "th", "tr", "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "ou", "y"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "x", "nd", "rk", "v"]
_CITY_SUFFIX = ["ford", "mere", "haven", "bury", "stead", "wick", "port", "dale", "holm", "gate"]
_ORG_SUFFIX = ["Institute", "Dynamics", "Foundry", "Collective", "Laboratories", "Trust", "Works", "Guild",
               "Observatory", "Company"]
_PROFESSIONS = ["architect", "marine biologist", "glassblower", "railway engineer", "astronomer", "cartographer",
                "violinist", "beekeeper", "chemist", "bridge builder", "historian", "pilot", "botanist",
                "clockmaker", "geologist", "surgeon", "economist", "sculptor", "linguist", "shipwright"]
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_EVENTS = ["a new harbour museum", "the restoration of the old tram line", "a winter lecture series",
           "a public garden on the river bank", "an exhibition of early maps", "a scholarship for young engineers",
           "the reopening of the central library", "a festival of lanterns", "a study of the northern cliffs",
           "a survey of the salt marshes"]
_REACTIONS = ["Residents gathered outside the town hall to hear the announcement.",
              "The council said it would publish the full plans next month.",
              "Local newspapers had followed the story for several weeks.",
              "A spokesperson declined to comment on the cost of the project.",
              "Critics said the timetable was too ambitious.",
              "Supporters called the decision long overdue.",
              "The mayor thanked volunteers who had worked through the summer.",
              "Tickets for the opening evening sold out within a day."]


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    size: SizeName = "small"


@dataclass
class Person:
    name: str
    city: str
    organisation: str
    profession: str
    year: int
    awards: int
    event: str
    articles: list[str] = field(default_factory=list)

    def qa(self) -> list[QAPair]:
        return [
            QAPair(f"In which city does {self.name} live?", self.city, self.name),
            QAPair(f"Which organisation does {self.name} work for?", self.organisation, self.name),
            QAPair(f"What is the profession of {self.name}?", self.profession, self.name),
            QAPair(f"In which year did {self.name} join {self.organisation}?", str(self.year), self.name),
            QAPair(f"How many awards has {self.name} won?", str(self.awards), self.name),
        ]


class _Namer:
    """Invented words, never repeated across the whole world (so splits stay disjoint)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: int) -> str:
        while True:
            parts = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(syllables)]
            candidate = "".join(parts) + self.rng.choice(_CODAS)
            if candidate not in self.used and len(candidate) >= 4:
                self.used.add(candidate)
                return candidate.capitalize()

    def person(self) -> str:
        return f"{self.word(2)} {self.word(self.rng.choice([2, 3]))}"

    def city(self) -> str:
        return self.word(2) + self.rng.choice(_CITY_SUFFIX)

    def organisation(self) -> str:
        return f"{self.word(2)} {self.rng.choice(_ORG_SUFFIX)}"


def _make_person(namer: _Namer, rng: random.Random) -> Person:
    return Person(
        name=namer.person(),
        city=namer.city(),
        organisation=namer.organisation(),
        profession=rng.choice(_PROFESSIONS),
        year=rng.randint(1961, 2019),
        awards=rng.randint(2, 97),
        event=rng.choice(_EVENTS),
    )


def _article_announcement(p: Person, rng: random.Random) -> str:
    first = p.name.split()[0]
    day, month, year = rng.randint(1, 28), rng.choice(_MONTHS), rng.randint(2020, 2024)
    visitors = rng.randint(120, 9800)
    return (
        f"{p.city.upper()}, {day} {month} {year} - {p.name}, a {p.profession} at {p.organisation}, "
        f"announced on {rng.choice(_WEEKDAYS)} that work will begin on {p.event}. "
        f"{first} joined {p.organisation} in {p.year} and has won {p.awards} awards since then. "
        f"The first phase is expected to draw {visitors} visitors to {p.city}. "
        f"{rng.choice(_REACTIONS)} {rng.choice(_REACTIONS)}"
    )


def _article_profile(p: Person, rng: random.Random) -> str:
    last = p.name.split()[-1]
    hours = rng.randint(3, 14)
    return (
        f"Profile: {p.name} of {p.city}. Few people in {p.city} know the work of {p.organisation} as well as "
        f"{p.name}. The {p.profession} arrived there in {p.year}, and colleagues say {last} still starts each "
        f"day before dawn, often working {hours} hours at a stretch. Over the years {last} has collected "
        f"{p.awards} awards, and most recently turned to {p.event}. {rng.choice(_REACTIONS)}"
    )


def _qa_digests(people: list[Person], rng: random.Random) -> list[str]:
    """Shuffled runs of DIGEST_PAIRS question/answer pairs about the split's people."""
    pairs = [pair for person in people for pair in person.qa()]
    digests = []
    for _ in range(DIGEST_PASSES):
        order = list(range(len(pairs)))
        rng.shuffle(order)
        for first in range(0, len(order), DIGEST_PAIRS):
            chunk = [pairs[i] for i in order[first:first + DIGEST_PAIRS]]
            digests.append("".join(f"Question: {p.question}\nAnswer: {p.answer}\n\n" for p in chunk).rstrip("\n"))
    return digests


def _split_qa(people: list[Person], rng: random.Random) -> tuple[list[QAPair], list[QAPair]]:
    """Questions for a split, and N_ICL few-shot pairs about other people of the same split."""
    pairs = [pair for person in people for pair in person.qa()]
    order = list(range(len(pairs)))
    rng.shuffle(order)
    icl_ids = set(order[:N_ICL])
    icl = [pairs[i] for i in sorted(icl_ids)]
    questions = [pairs[i] for i in range(len(pairs)) if i not in icl_ids]
    return questions, icl


def _verbmem_item(article: str) -> VerbMemItem:
    words = article.split(" ")
    cut = max(8, len(words) // 3)
    # the prompt keeps the space before the continuation, as the tokenizer attaches whitespace to the word before
    return VerbMemItem(prompt=" ".join(words[:cut]) + " ", gt=" ".join(words[cut:]))


def generate_corpus(config: SynthConfig = SynthConfig()) -> MuseCorpus:
    """Build the whole world in memory; `write_corpus` puts it on disk."""
    if config.size not in _SIZES:
        raise ValueError(f"unknown size {config.size!r}")
    rng = random.Random(config.seed)
    namer = _Namer(rng)
    n_forget, n_retain1, n_retain2, n_holdout = _SIZES[config.size]
    groups: dict[str, list[Person]] = {}
    for split, count in (("forget", n_forget), ("retain1", n_retain1), ("retain2", n_retain2),
                         ("holdout", n_holdout)):
        groups[split] = [_make_person(namer, rng) for _ in range(count)]
        for person in groups[split]:
            person.articles = [_article_announcement(person, rng), _article_profile(person, rng)]

    corpus = MuseCorpus(root=Path("."))
    for split, people in groups.items():
        docs = [article for person in people for article in person.articles]
        if split in ("forget", "retain1"):
            docs += _qa_digests(people, rng)
        corpus.raw[split] = docs

    corpus.verbmem = [_verbmem_item(a) for p in groups["forget"] for a in p.articles]
    forget_qa, forget_icl = _split_qa(groups["forget"], rng)
    retain_qa, retain_icl = _split_qa(groups["retain1"], rng)
    corpus.knowmem = {"forget_qa": forget_qa, "retain_qa": retain_qa,
                      "forget_qa_icl": forget_icl, "retain_qa_icl": retain_icl}
    corpus.privleak = {
        "forget": [a for p in groups["forget"] for a in p.articles],
        "retain": [a for p in groups["retain1"] for a in p.articles],
        "holdout": [a for p in groups["holdout"] for a in p.articles],
    }
    return corpus
