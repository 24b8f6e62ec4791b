"""Type aliases shared across the package.

`HFModel`: a Hugging Face transformers or peft model. Its attributes depend on the architecture and the wrapper
(`config.hidden_size`, `get_output_embeddings()`, `merge_and_unload()`, `disable_adapter()`, ...), and torch types
every attribute of a plain `nn.Module` as `Tensor | Module`, so neither `nn.Module` nor `PreTrainedModel` describes
what the code calls; it is typed as `Any` here, in one place, and the signatures that take such a model say so.
"""

from __future__ import annotations

from typing import Any, TypeAlias

HFModel: TypeAlias = Any  # transformers / peft models: attributes depend on the architecture
