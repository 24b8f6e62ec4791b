"""The stage that makes the models unlearning starts from: the target (trained on forget + retain1) and the retrain
(retain1 only), from scratch (the built-in tiny Llama) or by fine-tuning a pretrained base. It sits above `eval/`
(every fine-tuning epoch is scored with MUSE's KnowMem) and below the experiment that calls it."""

from qrunlearn.lazy import lazy_exports

_EXPORTS = {
    **{name: "qrunlearn.targets.build" for name in ("TargetConfig", "build_target_and_retrain")},
    **{name: "qrunlearn.targets.config" for name in ("BaseTargetConfig", "FinetuneRecipe")},
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
