"""MUSE-layout data: loading, validation, the built-in synthetic benchmark."""

from qrunlearn.lazy import lazy_exports

__all__ = ["MuseCorpus", "QAPair", "VerbMemItem", "load_corpus", "write_corpus"]
__getattr__, __dir__ = lazy_exports(__name__, {name: "qrunlearn.data.muse" for name in __all__})
