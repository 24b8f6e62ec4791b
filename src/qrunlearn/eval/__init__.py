"""MUSE evaluation (VerbMem, KnowMem, PrivLeak) and MIA AUCs, batched; see `evaluate.py`."""

from qrunlearn.eval.evaluate import (
    METRIC_NAMES,
    RETRAIN_AUC_PRESETS,
    EvalConfig,
    EvalResult,
    check_corpus,
    evaluate,
    privleak_auc,
    write_eval_outputs,
)

__all__ = [
    "METRIC_NAMES", "RETRAIN_AUC_PRESETS", "EvalConfig", "EvalResult", "check_corpus", "evaluate",
    "privleak_auc", "write_eval_outputs",
]
