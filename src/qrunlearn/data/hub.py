"""MUSE corpora from the Hugging Face hub (`muse-bench/MUSE-News`, `muse-bench/MUSE-Books`).

The hub dataset holds one config per MUSE folder (raw, verbmem, knowmem, privleak) with one split per file;
`export_hub_corpus` writes them in the on-disk layout so everything downstream reads one format.
Needs network access to the hub; offline it fails with one line.
"""

from __future__ import annotations

from pathlib import Path

from datasets import load_dataset

from qrunlearn.data.muse import (
    MuseCorpus,
    QAPair,
    VerbMemItem,
    load_corpus,
    write_corpus,
)
from qrunlearn.errors import UserError

# config -> (split names, kind)
_CONFIGS = {
    "raw": ("forget", "retain1", "retain2", "holdout"),
    "verbmem": ("forget",),
    "knowmem": ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl"),
    "privleak": ("forget", "retain", "holdout"),
}


def export_hub_corpus(dataset_id: str, out: Path | str) -> MuseCorpus:
    corpus = MuseCorpus(root=Path(out))
    for config, splits in _CONFIGS.items():
        for split in splits:
            try:
                rows = load_dataset(dataset_id, config, split=split)
            except Exception as err:  # the hub client raises many types; all mean "not reachable / not there"
                raise UserError(f"{dataset_id}: cannot load config '{config}' split '{split}' "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
            if config in ("raw", "privleak"):
                texts = [row["text"] for row in rows]
                (corpus.raw if config == "raw" else corpus.privleak)[split] = texts
            elif config == "verbmem":
                corpus.verbmem = [VerbMemItem(row["prompt"], row["gt"]) for row in rows]
            else:
                corpus.knowmem[split] = [QAPair(row["question"], row["answer"]) for row in rows]
    write_corpus(corpus, out)
    return load_corpus(out)  # validate what was written

