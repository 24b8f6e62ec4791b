"""Unlearning: GA / NPO / SimNPO with GDR / KLR, full fine-tuning or LoRA merged before quantization."""

from qrunlearn.unlearn.config import UnlearnConfig
from qrunlearn.unlearn.engine import UnlearnResult, unlearn
from qrunlearn.unlearn.select import select_epoch

__all__ = ["UnlearnConfig", "UnlearnResult", "select_epoch", "unlearn"]
