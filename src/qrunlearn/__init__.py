"""qrunlearn: quantization-robust LLM unlearning."""

__version__ = "0.1.0"
