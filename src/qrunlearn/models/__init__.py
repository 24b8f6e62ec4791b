"""Model loading (any HF causal LM, or a GGUF file), GGUF import, and the built-in tiny Llama targets."""

from qrunlearn.lazy import lazy_exports

_LOADING = ["ModelSource", "default_device", "ensure_pad_token", "load_causal_lm", "load_tokenizer", "resolve_dtype"]
_GGUF = ["GridShare", "import_gguf", "is_gguf", "q4_1_grid_share"]
__all__ = _LOADING + _GGUF
__getattr__, __dir__ = lazy_exports(__name__, {**{name: "qrunlearn.models.loading" for name in _LOADING},
                                               **{name: "qrunlearn.models.gguf" for name in _GGUF}})
