"""A GGUF file run by llama.cpp (llama-cpp-python, the optional `make llamacpp` extra) behind the two calls
qrunlearn's evaluation needs: the logits of every position of a token sequence, and a greedy continuation.

Token ids come from the model's own Hugging Face tokenizer, so llama.cpp and torch see identical inputs; llama.cpp
runs the deployed arithmetic (its quantized weights, its activation quantization in the quantized matrix products,
its kernels). `LlamaCppModel` carries the source model's transformers config and generation config, which the
evaluation reads for the context length, the vocabulary size and the stop tokens.
"""

from __future__ import annotations

import copy
import ctypes
import importlib.util
import logging
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from qrunlearn.errors import MissingDependencyError, UserError

# llama-cpp-python keeps one float32 row of logits per context position (n_ctx x vocab: 0.8 GB for SmolLM2's
# 49,152-token vocabulary at 4,096); longer texts are truncated to this, as they would be at any model's context.
MAX_CONTEXT = 4096
# Fewer tokens in common with the previous sequence than this and the cache is not reused (as
# eval.generation.MIN_SHARED_PREFIX for torch): a scored text then never depends on what ran before it.
REUSE_PREFIX = 32
INSTALL_HINT = "make llamacpp (builds llama-cpp-python from source: ~30 min on 2 cores)"


def require_llamacpp(feature: str = "llama.cpp GGUF formats") -> None:
    """One-line MissingDependencyError naming the install command when llama-cpp-python is absent."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise MissingDependencyError("llama-cpp-python", feature, hint=INSTALL_HINT)


_NATIVE_LOG: list = []  # the installed ctypes callback, kept alive for as long as llama.cpp may call it
logger = logging.getLogger(__name__)


def import_llamacpp():
    """The llama_cpp module, with llama.cpp's native log (a line per tensor it loads or quantizes, printed to stderr
    even with verbose=False) routed to this module's logger at debug level, errors as errors."""
    require_llamacpp()
    import llama_cpp

    if not _NATIVE_LOG:
        @llama_cpp.llama_log_callback
        def native_log(level: int, text: bytes, user_data) -> None:
            # ggml's levels: 1 debug, 2 info, 3 warn (the per-tensor type fallbacks, which tensor_types reports
            # anyway), 4 error, 5 continuation (llama-cpp-python's own callback still reads them as 0-3 + 5)
            logger.log(logging.ERROR if level == 4 else logging.DEBUG, "%s", text.decode("utf-8", "replace").rstrip())

        llama_cpp.llama_log_set(native_log, ctypes.c_void_p(0))
        _NATIVE_LOG.append(native_log)
    return llama_cpp


class LlamaCppModel:
    """A loaded GGUF file. Not a torch module: a `models.runtime.SequenceModel`, which the evaluation runs through
    `logits` and `greedy`."""

    training = False
    description = "llama.cpp GGUF"

    def __init__(self, path: Path | str, config, generation_config=None, threads: int | None = None,
                 max_context: int = MAX_CONTEXT, keep_alive: object = None):
        Llama = import_llamacpp().Llama

        self.path = Path(path)
        self.n_ctx = min(int(getattr(config, "max_position_embeddings", None) or max_context), max_context)
        self.config = copy.deepcopy(config)
        self.config.max_position_embeddings = self.n_ctx
        self.generation_config = generation_config
        self._keep_alive = keep_alive  # e.g. the temporary folder holding the file
        # as many threads as torch uses (OMP_NUM_THREADS / torch.set_num_threads): llama.cpp's workers spin at
        # every barrier, so more threads than free cores is ruinous (benchmarks/RESULTS.md, "llama.cpp")
        threads = threads or torch.get_num_threads()
        try:
            self._llama = Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_batch=min(self.n_ctx, 512),
                                logits_all=True, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
        except (ValueError, RuntimeError) as err:
            raise UserError(f"{self.path}: llama.cpp cannot load this GGUF ({err})") from None
        # freed before interpreter shutdown tears down the llama_cpp module its destructor calls into
        weakref.finalize(self, self._llama.close)
        if self._llama.n_vocab() != int(config.vocab_size):
            raise UserError(f"{self.path}: llama.cpp reads a {self._llama.n_vocab()}-token vocabulary, the model's "
                            f"config says {config.vocab_size}")

    # the few torch-module calls the evaluation makes on any model
    def eval(self) -> LlamaCppModel:
        return self

    def train(self, mode: bool = True) -> LlamaCppModel:
        return self

    def _check_length(self, tokens: int) -> None:
        if tokens > self.n_ctx:
            raise ValueError(f"{tokens} tokens exceed llama.cpp's context of {self.n_ctx}")

    def _run(self, ids: Sequence[int]) -> None:
        """Bring the cache to exactly `ids`: the tokens it already holds in front (the few-shot block every KnowMem
        prompt starts with) are kept when there are at least REUSE_PREFIX of them, the rest evaluated."""
        ids = [int(i) for i in ids]
        held = self._llama.input_ids[:self._llama.n_tokens].tolist()
        keep, limit = 0, min(len(held), len(ids) - 1)  # the last position always runs: its logits are fresh
        while keep < limit and held[keep] == ids[keep]:
            keep += 1
        if keep < REUSE_PREFIX:
            keep = 0
        self._llama.n_tokens = keep  # eval() drops the cache entries past n_tokens before it runs the rest
        self._llama.eval(ids[keep:])

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """(len(ids), vocab) float32 logits of every position."""
        self._check_length(len(ids))
        self._run(ids)
        return torch.from_numpy(np.array(self._llama.scores[:len(ids)], dtype=np.float32))

    def greedy(self, prompt: Sequence[int], max_new_tokens: int, eos: set[int],
               should_stop: Callable[[list[int]], bool] | None = None) -> list[int]:
        """Greedy new tokens after `prompt`: ends with an eos token (kept), after `max_new_tokens`, or once
        `should_stop(tokens so far)` is true; the same rule as `eval.generation.generate_batch`."""
        self._check_length(len(prompt) + max(max_new_tokens - 1, 0))
        self._run(prompt)
        generated: list[int] = []
        for step in range(max_new_tokens):
            token = int(np.argmax(self._llama.scores[self._llama.n_tokens - 1]))
            generated.append(token)
            if token in eos or (should_stop is not None and should_stop(generated)) or step == max_new_tokens - 1:
                break
            self._llama.eval([token])
        return generated
