"""Ready-made epoch hooks. `knowmem_hook` scores KnowMem on forget and retain with the MUSE evaluator
(`qrunlearn.eval`), giving the "knowmem_forget" key that MUSE's selection rule reads."""

from __future__ import annotations

from typing import Any, Callable

from qrunlearn.data.muse import MuseCorpus


def knowmem_hook(corpus: MuseCorpus, limit: int | None = None, batch_size: int = 16
                 ) -> Callable[[int, Any, Any], dict[str, float]]:
    """hook(epoch, model, tokenizer) -> {"knowmem_forget": F1 x100, "knowmem_retain": F1 x100}."""
    from qrunlearn.eval.evaluate import EvalConfig, evaluate

    config = EvalConfig(metrics=("knowmem_f", "knowmem_r"), limit=limit, batch_size=batch_size,
                        bootstrap_samples=1, mia=False)

    def hook(epoch: int, model, tokenizer) -> dict[str, float]:
        metrics = evaluate(model, tokenizer, corpus, config, progress=False).metrics
        return {"knowmem_forget": metrics["knowmem_f"], "knowmem_retain": metrics["knowmem_r"]}

    return hook
