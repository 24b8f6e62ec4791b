"""Quantization behind one interface (RTN, bitsandbytes NF4/FP4/int8, HQQ, GPTQ) and update-survival diagnostics.

    spec = parse_spec("rtn:w4g64")          # or "nf4", "fp4", "int8", "hqq:w4g64", "gptq:w4g128", "fp"
    quantize_model(model, spec)              # every linear in the transformer blocks; embeddings/lm_head stay fp
    report = survival_report(base, unlearned, spec); print(report.verdict)
"""

from qrunlearn.quant.common import QuantizedWeight, target_linear_names
from qrunlearn.quant.registry import (
    available_methods,
    load_quantized,
    quantize_model,
    quantize_weight,
    quantized_codes,
    save_quantized,
)
from qrunlearn.quant.spec import QuantSpec, parse_spec
from qrunlearn.quant.survival import LayerSurvival, SurvivalReport, plot_survival, survival_report

__all__ = [
    "LayerSurvival", "QuantSpec", "QuantizedWeight", "SurvivalReport", "available_methods", "load_quantized",
    "parse_spec", "plot_survival", "quantize_model", "quantize_weight", "quantized_codes", "save_quantized",
    "survival_report", "target_linear_names",
]
