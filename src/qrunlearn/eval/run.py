"""`qrunlearn eval` behind the CLI: check every input first (one-line errors), then load, evaluate, write."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

from qrunlearn.data.muse import load_corpus
from qrunlearn.errors import UserError
from qrunlearn.eval.config import METRIC_NAMES, RETRAIN_AUC_PRESETS, EvalConfig
from qrunlearn.eval.muse import (
    EvalResult,
    check_corpus,
    evaluate,
    privleak_auc,
    write_eval_outputs,
)
from qrunlearn.models.loading import DTypeName
from qrunlearn.models.runtime import SequenceModel
from qrunlearn.models.source import ModelSource
from qrunlearn.quant.registry import load_model_folder
from qrunlearn.quant.spec import QuantSpec


def parse_retrain_auc(text: str) -> float:
    """A number in (0, 1], or a preset name ('news', 'books': MUSE's published retrain AUCs)."""
    if text.lower() in RETRAIN_AUC_PRESETS:
        return RETRAIN_AUC_PRESETS[text.lower()]
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--retrain-auc: '{text}' is neither a number nor one of "
                        f"{', '.join(RETRAIN_AUC_PRESETS)}") from None
    if not 0.0 < value <= 1.0:
        raise UserError(f"--retrain-auc: {value} is not in (0, 1]")
    return value


def quantization_spec(model, saved: QuantSpec | None = None) -> Any:
    """The model config's `quantization_config` (bitsandbytes, HQQ, ...) as a plain dict, else the label of the
    spec re-applied on load (RTN/HQQ folders from `qrunlearn quantize`), else None."""
    spec = getattr(model.config, "quantization_config", None)
    if spec is None:
        return saved.label if saved is not None else None
    return spec.to_dict() if hasattr(spec, "to_dict") else spec


def _release_memory() -> None:
    """Return freed model memory to the allocator (the caller deletes its own references first: a `del` in here
    would only drop this function's name)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def eval_folder(model_path: Path, data_path: Path, out: Path, config: EvalConfig, retrain_path: Path | None = None,
                retrain_auc: str | None = None, dtype: DTypeName = "auto", progress: bool = True) -> EvalResult:
    """Evaluate a model folder on a corpus folder and write `out` plus its items file."""
    if retrain_path is not None and retrain_auc is not None:
        raise UserError("give either --retrain or --retrain-auc, not both")
    reference = parse_retrain_auc(retrain_auc) if retrain_auc is not None else None
    corpus = load_corpus(data_path)
    check_corpus(corpus, config.metrics)
    wants_privleak = "privleak" in config.metrics
    sources = [ModelSource(str(model_path))]
    if retrain_path is not None and wants_privleak:
        sources.append(ModelSource(str(retrain_path)))
    for source in sources:
        source.check()
        source.check_tokenizer()

    if retrain_path is not None and wants_privleak:
        retrain_model, retrain_tokenizer, _ = load_model_folder(retrain_path, dtype=dtype)
        reference = privleak_auc(retrain_model, retrain_tokenizer, corpus, config, progress=progress)
        del retrain_model, retrain_tokenizer
        _release_memory()

    model, tokenizer, saved_spec = load_model_folder(model_path, dtype=dtype)
    result = evaluate(model, tokenizer, corpus, config, retrain_auc=reference, progress=progress)
    result.settings["retrain_auc_source"] = (
        str(retrain_path) if retrain_path is not None else retrain_auc
    )
    result.settings["dtype"] = (model.description if isinstance(model, SequenceModel)
                                else str(next(iter(model.get_input_embeddings().parameters())).dtype))
    write_eval_outputs(result, out, model_path=model_path, quant_spec=quantization_spec(model, saved_spec),
                       data_path=data_path, retrain=str(retrain_path) if retrain_path is not None else retrain_auc)
    return result


def format_summary(result: EvalResult) -> str:
    lines = []
    for key in (*METRIC_NAMES, "privleak_auc", "knowmem_f_recall", "knowmem_r_recall"):
        if key not in result.metrics:
            continue
        value = result.metrics[key]
        if value is None:
            lines.append(f"{key:>18}: n/a (no retrain AUC: give --retrain or --retrain-auc)")
            continue
        interval = result.intervals.get(key)
        ci = f"  [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""
        timing = result.timings.get(key)
        took = f"  ({timing:.1f}s)" if timing is not None else ""
        lines.append(f"{key:>18}: {value:.3f}{ci}{took}")
    return "\n".join(lines)
