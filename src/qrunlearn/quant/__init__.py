"""Quantization behind one interface (RTN, bitsandbytes NF4/FP4/int8, HQQ, GPTQ, llama.cpp GGUF) and update-survival
diagnostics.

    spec = parse_spec("rtn:w4g64")          # or "nf4", "fp4", "int8", "hqq:w4g64", "gptq:w4g128", "gguf:q4_k_m", "fp"
    quantize_model(model, spec)              # every linear in the transformer blocks; embeddings/lm_head stay fp
    report = survival_report(base, unlearned, spec); print(report.verdict)
    first_order(base, unlearned, spec, gradient).predicted_reversion  # gradient: eval.gradient.answer_nll_gradient
    with fake_quantized(model, "nf4"): loss = ...  # train on Q(W) (straight-through), for quantization-aware unlearning
"""

from qrunlearn.lazy import lazy_exports

_EXPORTS = {
    "QuantizedWeight": "qrunlearn.quant.common",
    "target_linear_names": "qrunlearn.models.layers",
    **{name: "qrunlearn.quant.fake" for name in ("fake_quantize", "fake_quantized")},
    **{name: "qrunlearn.quant.registry" for name in ("available_methods", "has_weight_codes", "load_quantized",
                                                     "quantize_model", "quantize_weight", "quantized_codes",
                                                     "save_quantized")},
    **{name: "qrunlearn.quant.spec" for name in ("FULL_PRECISION", "QuantSpec", "is_full_precision", "parse_spec")},
    **{name: "qrunlearn.quant.survival" for name in ("FirstOrder", "LayerSurvival", "SurvivalReport",
                                                     "first_order", "plot_survival", "survival_report")},
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
