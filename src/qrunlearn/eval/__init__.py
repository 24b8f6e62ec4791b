"""MUSE evaluation (VerbMem, KnowMem, PrivLeak) and MIA AUCs, batched; see `muse.py`."""

from qrunlearn.lazy import lazy_exports

_EXPORTS = {
    **{name: "qrunlearn.eval.config" for name in ("METRIC_NAMES", "RETRAIN_AUC_PRESETS", "EvalConfig")},
    **{name: "qrunlearn.eval.muse" for name in ("EvalResult", "check_corpus", "evaluate", "privleak_auc",
                                                    "write_eval_outputs")},
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
