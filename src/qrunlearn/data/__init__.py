"""MUSE-layout data: loading, validation, the built-in synthetic benchmark."""

from qrunlearn.data.muse import MuseCorpus, QAPair, VerbMemItem, load_corpus, write_corpus

__all__ = ["MuseCorpus", "QAPair", "VerbMemItem", "load_corpus", "write_corpus"]
