"""qrunlearn: quantization-robust LLM unlearning."""

import logging as _logging

__version__ = "0.1.0"

# peft imports torchao when it is installed; on a CPU-only torch, torchao logs that its CUDA kernels cannot
# load and torch logs pytree deprecations. Neither concerns anything qrunlearn does, so they stay quiet.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)

import warnings as _warnings

# peft asks transformers whether gradient checkpointing is on through a name transformers 5 deprecated; the
# warning repeats on every LoRA run and is not actionable for users.
_warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
