"""Model loading (any HF causal LM) and the built-in tiny Llama targets."""

from qrunlearn.lazy import lazy_exports

__all__ = ["ModelSource", "default_device", "ensure_pad_token", "load_causal_lm", "load_tokenizer", "resolve_dtype"]
__getattr__, __dir__ = lazy_exports(__name__, {name: "qrunlearn.models.loading" for name in __all__})
