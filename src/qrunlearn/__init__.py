"""qrunlearn: quantization-robust LLM unlearning."""

import logging as _logging

__version__ = "0.1.0"

# peft imports torchao when it is installed; on a CPU-only torch, torchao logs that its CUDA kernels cannot
# load and torch logs pytree deprecations. Neither concerns anything qrunlearn does, so they stay quiet.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
