"""Unlearning: GA / NPO / SimNPO with GDR / KLR, full fine-tuning or LoRA merged before quantization."""

from qrunlearn.lazy import lazy_exports

_EXPORTS = {
    "UnlearnConfig": "qrunlearn.unlearn.config",
    "UnlearnRecipe": "qrunlearn.unlearn.recipe", "unlearn": "qrunlearn.unlearn.recipe",
    "EpochRecord": "qrunlearn.unlearn.records", "StepLoss": "qrunlearn.unlearn.records",
    "UnlearnResult": "qrunlearn.unlearn.records",
    "select_epoch": "qrunlearn.unlearn.select",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
