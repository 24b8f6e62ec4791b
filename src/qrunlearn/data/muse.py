"""MUSE's corpus layout as typed objects, with a validator that names the file, item and field.

Layout (one folder per corpus)::

    raw/{forget,retain1,retain2,holdout}.json|.txt     documents (JSON list of strings, or .txt)
    verbmem/forget.json                                [{"prompt": str, "gt": str}]
    knowmem/{forget,retain}_qa.json                    [{"question": str, "answer": str}]
    knowmem/{forget,retain}_qa_icl.json                the few-shot examples, same shape
    privleak/{forget,retain,holdout}.json              [str]
    scal/forget_{1..4}.*, sust/forget_{1..4}.*         optional, documents like raw/

A `.txt` raw file is one document (MUSE ships News' raw/forget.txt like that and chunks it by tokens).

MUSE's public folders ship document splits twice, as `<split>.json` and `<split>.txt` (the same documents joined
into one text). When both exist the JSON is loaded, because it keeps the document boundaries, after checking that
the two hold the same text once all whitespace is removed (so the separator the .txt joins documents with does not
matter); when they differ, a `DataError` names both files. `corpus.sources` records which file each split was
read from, and `qrunlearn data check` prints it.

Every part is optional when loading; code that needs a part calls `corpus.require(...)`, which raises a
`DataError` naming the missing file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qrunlearn.errors import DataError
from qrunlearn.io import atomic_write_text

RAW_SPLITS = ("forget", "retain1", "retain2", "holdout")
PRIVLEAK_SPLITS = ("forget", "retain", "holdout")
KNOWMEM_FILES = ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl")
EXTRA_DIRS = ("scal", "sust")


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str
    # whom the question is about, where the corpus says (optional "subject" key; the built-in corpus gives it): the
    # relearning probe splits the forget set by subject
    subject: str | None = None


@dataclass(frozen=True)
class VerbMemItem:
    prompt: str
    gt: str


@dataclass(frozen=True)
class DocumentSource:
    """The file a document split was read from, and its twin holding the same text (checked, not read), if any."""

    path: Path
    same_text_as: Path | None = None


@dataclass
class MuseCorpus:
    """A MUSE corpus. Keys of `raw`: forget/retain1/retain2/holdout; of `knowmem`: forget_qa, retain_qa,
    forget_qa_icl, retain_qa_icl; of `privleak`: forget/retain/holdout; `extra` holds scal/ and sust/ splits
    as "scal/forget_1" etc. Only the files present on disk are loaded. `sources` says which file each document
    split (raw/ and extra, keyed "raw/forget", "scal/forget_1", ...) was read from."""

    root: Path
    raw: dict[str, list[str]] = field(default_factory=dict)
    verbmem: list[VerbMemItem] | None = None
    knowmem: dict[str, list[QAPair]] = field(default_factory=dict)
    privleak: dict[str, list[str]] = field(default_factory=dict)
    extra: dict[str, list[str]] = field(default_factory=dict)
    sources: dict[str, DocumentSource] = field(default_factory=dict)

    # -- access with clear errors -------------------------------------------------------------------------
    def require_raw(self, split: str) -> list[str]:
        if split not in self.raw:
            raise DataError(self.root / "raw" / f"{split}.json", "missing (needed: raw split '%s')" % split)
        return self.raw[split]

    def require_verbmem(self) -> list[VerbMemItem]:
        if self.verbmem is None:
            raise DataError(self.root / "verbmem" / "forget.json", "missing (needed for VerbMem)")
        return self.verbmem

    def require_knowmem(self, name: str) -> list[QAPair]:
        if name not in self.knowmem:
            raise DataError(self.root / "knowmem" / f"{name}.json", "missing (needed for KnowMem)")
        return self.knowmem[name]

    def require_privleak(self, split: str) -> list[str]:
        if split not in self.privleak:
            raise DataError(self.root / "privleak" / f"{split}.json", "missing (needed for PrivLeak/MIA)")
        return self.privleak[split]

    def summary(self) -> dict[str, int]:
        """Item counts per file, keyed like the on-disk paths ("raw/forget", "knowmem/forget_qa", ...)."""
        counts: dict[str, int] = {}
        for split, docs in self.raw.items():
            counts[f"raw/{split}"] = len(docs)
        if self.verbmem is not None:
            counts["verbmem/forget"] = len(self.verbmem)
        for name, pairs in self.knowmem.items():
            counts[f"knowmem/{name}"] = len(pairs)
        for split, texts in self.privleak.items():
            counts[f"privleak/{split}"] = len(texts)
        for name, docs in self.extra.items():
            counts[name] = len(docs)
        return counts


# -- parsing --------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(path, f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise DataError(path, f"cannot read: {err.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(path, f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None


def _expect_nonempty_list(path: Path, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise DataError(path, f"expected a JSON list, got {type(value).__name__}")
    if not value:
        raise DataError(path, "empty list")
    return value


def parse_string_list(path: Path, value: Any) -> list[str]:
    items = _expect_nonempty_list(path, value)
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise DataError(path, f"expected a string, got {type(item).__name__}", index=index)
        if not item.strip():
            raise DataError(path, "empty string", index=index)
    return items


def _parse_records(path: Path, value: Any, keys: tuple[str, str]) -> list[tuple[str, str]]:
    items = _expect_nonempty_list(path, value)
    records: list[tuple[str, str]] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(path, f"expected an object with {', '.join(keys)}, got {type(item).__name__}",
                            index=index)
        values = []
        for key in keys:
            if key not in item:
                raise DataError(path, "missing key", index=index, field=key)
            if not isinstance(item[key], str):
                raise DataError(path, f"expected a string, got {type(item[key]).__name__}", index=index, field=key)
            if not item[key].strip():
                raise DataError(path, "empty string", index=index, field=key)
            values.append(item[key])
        records.append((values[0], values[1]))
    return records


def parse_qa(path: Path, value: Any) -> list[QAPair]:
    pairs = []
    for index, (question, answer) in enumerate(_parse_records(path, value, ("question", "answer"))):
        subject = value[index].get("subject")
        if subject is not None and not (isinstance(subject, str) and subject.strip()):
            raise DataError(path, "expected a non-empty string", index=index, field="subject")
        pairs.append(QAPair(question, answer, subject))
    return pairs


def parse_verbmem(path: Path, value: Any) -> list[VerbMemItem]:
    return [VerbMemItem(p, g) for p, g in _parse_records(path, value, ("prompt", "gt"))]


def read_documents(path: Path) -> list[str]:
    """A raw split: a JSON list of strings, or a .txt file read whole as one document (as MUSE reads
    News' raw/forget.txt: the text is tokenised once and cut into max-length windows)."""
    if path.suffix == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(path, f"not UTF-8 text ({err.reason} at byte {err.start})") from None
        if not text.strip():
            raise DataError(path, "empty file")
        return [text]
    return parse_string_list(path, _read_json(path))


def _without_whitespace(text: str) -> str:
    return "".join(text.split())


def _check_same_text(json_path: Path, documents: list[str], txt_path: Path) -> None:
    """Raise a `DataError` naming both files unless the .txt holds the JSON's documents (whitespace ignored)."""
    joined = _without_whitespace("".join(documents))
    text = _without_whitespace(read_documents(txt_path)[0])
    if joined == text:
        return
    offset = next((i for i, (a, b) in enumerate(zip(joined, text)) if a != b), min(len(joined), len(text)))
    raise DataError(json_path, f"holds different text from {txt_path} (first difference at non-whitespace "
                               f"character {offset}); MUSE's two copies of a split must match: keep the right one")


def load_documents(folder: Path, stem: str) -> tuple[list[str], DocumentSource] | None:
    """The documents of split `stem` in `folder` and where they came from, or None when neither `<stem>.json`
    nor `<stem>.txt` exists. With both, the JSON (it keeps document boundaries), once the .txt is checked to hold
    the same text."""
    json_path, txt_path = folder / f"{stem}.json", folder / f"{stem}.txt"
    if json_path.exists():
        documents = read_documents(json_path)
        if not txt_path.exists():
            return documents, DocumentSource(json_path)
        _check_same_text(json_path, documents, txt_path)
        return documents, DocumentSource(json_path, same_text_as=txt_path)
    if txt_path.exists():
        return read_documents(txt_path), DocumentSource(txt_path)
    return None


def describe_sources(corpus: MuseCorpus) -> list[str]:
    """One line per document split: the file it was read from (relative to the corpus root), and its twin."""
    lines = []
    for key, source in corpus.sources.items():
        line = f"{key}: read {source.path.relative_to(corpus.root)}"
        if source.same_text_as is not None:
            line += f" ({source.same_text_as.relative_to(corpus.root)} holds the same text; JSON keeps documents apart)"
        lines.append(line)
    return lines


def load_corpus(root: Path | str) -> MuseCorpus:
    """Load every MUSE file present under `root`, validating each. Raises `DataError` on bad input."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "not a directory")
    corpus = MuseCorpus(root=root)
    known_dirs = ("raw", "verbmem", "knowmem", "privleak", *EXTRA_DIRS)
    if not any((root / name).is_dir() for name in known_dirs):
        raise DataError(root, f"no MUSE folders found (expected some of: {', '.join(known_dirs)})")

    for split in RAW_SPLITS:
        loaded = load_documents(root / "raw", split)
        if loaded is not None:
            corpus.raw[split], corpus.sources[f"raw/{split}"] = loaded

    verbmem_path = root / "verbmem" / "forget.json"
    if verbmem_path.exists():
        corpus.verbmem = parse_verbmem(verbmem_path, _read_json(verbmem_path))
    elif (root / "verbmem").is_dir():
        raise DataError(verbmem_path, "missing (the verbmem/ folder exists but has no forget.json)")

    if (root / "knowmem").is_dir():
        for name in KNOWMEM_FILES:
            path = root / "knowmem" / f"{name}.json"
            if path.exists():
                corpus.knowmem[name] = parse_qa(path, _read_json(path))
        for split in ("forget", "retain"):
            has_qa, has_icl = f"{split}_qa" in corpus.knowmem, f"{split}_qa_icl" in corpus.knowmem
            if has_qa != has_icl:
                missing = f"{split}_qa_icl" if has_qa else f"{split}_qa"
                raise DataError(root / "knowmem" / f"{missing}.json", "missing (KnowMem needs the QA and its ICL file)")

    if (root / "privleak").is_dir():
        for split in PRIVLEAK_SPLITS:
            path = root / "privleak" / f"{split}.json"
            if path.exists():
                corpus.privleak[split] = parse_string_list(path, _read_json(path))

    for name in EXTRA_DIRS:
        folder = root / name
        if folder.is_dir():
            for stem in sorted({path.stem for path in [*folder.glob("*.json"), *folder.glob("*.txt")]}):
                loaded = load_documents(folder, stem)
                if loaded is not None:
                    corpus.extra[f"{name}/{stem}"], corpus.sources[f"{name}/{stem}"] = loaded
    return corpus


def write_corpus(corpus: MuseCorpus, root: Path | str) -> Path:
    """Write a corpus in MUSE's layout (JSON everywhere), each file atomically. Deterministic bytes."""
    root = Path(root)

    def dump(rel: str, value: Any) -> None:
        atomic_write_text(root / rel, json.dumps(value, indent=1, ensure_ascii=False) + "\n")

    for split, docs in corpus.raw.items():
        dump(f"raw/{split}.json", docs)
    if corpus.verbmem is not None:
        dump("verbmem/forget.json", [{"prompt": v.prompt, "gt": v.gt} for v in corpus.verbmem])
    for name, pairs in corpus.knowmem.items():
        dump(f"knowmem/{name}.json", [{"question": p.question, "answer": p.answer}
                                      | ({"subject": p.subject} if p.subject is not None else {}) for p in pairs])
    for split, texts in corpus.privleak.items():
        dump(f"privleak/{split}.json", texts)
    for name, docs in corpus.extra.items():
        dump(f"{name}.json", docs)
    return root
