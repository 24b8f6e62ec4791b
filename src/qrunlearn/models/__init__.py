"""Model loading (any HF causal LM) and the built-in tiny Llama targets."""

from qrunlearn.models.loading import ModelSource, default_device, ensure_pad_token, load_causal_lm, load_tokenizer

__all__ = ["ModelSource", "default_device", "ensure_pad_token", "load_causal_lm", "load_tokenizer"]
