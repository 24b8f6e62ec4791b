"""Model loading (any HF causal LM, or a GGUF file), GGUF import, and the built-in tiny Llama targets."""

from qrunlearn.lazy import lazy_exports

_EXPORTS = {
    **{name: "qrunlearn.models.loading" for name in ("default_device", "ensure_pad_token", "load_causal_lm",
                                                     "load_tokenizer", "resolve_dtype")},
    **{name: "qrunlearn.models.source" for name in ("ModelSource", "is_gguf", "resolve_model_path")},
    **{name: "qrunlearn.models.gguf" for name in ("GridShare", "import_gguf", "q4_1_grid_share")},
    "model_identity": "qrunlearn.models.identity",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
