"""CUDA checks (skipped without a GPU): every backend quantizes, runs forward + generate on the GPU, and stores the
same codes as the CPU path for the same fp32 weights."""

import copy

import pytest
import torch

from qrunlearn.quant import available_methods, quantize_model, quantized_codes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("spec", ["rtn:w4g64", "rtn:w8", "nf4", "fp4", "int8", "hqq:w4g64"])
def test_quantized_model_runs_on_cuda(tiny_model_and_tokenizer, spec):
    from qrunlearn.quant.spec import parse_spec

    if not available_methods()[parse_spec(spec).method]:
        pytest.skip(f"{spec}: backend not installed")
    model, tokenizer = tiny_model_and_tokenizer
    cpu_codes = quantized_codes(model, spec)
    cuda_model = quantize_model(copy.deepcopy(model).to("cuda"), spec)
    gpu_codes = {k: v.cpu() for k, v in quantized_codes(cuda_model, spec).items()}
    agree = sum(int((gpu_codes[k] == cpu_codes[k]).sum()) for k in cpu_codes) / sum(
        v.numel() for v in cpu_codes.values())
    # RTN and NF4 are the same elementwise maths on both devices. bitsandbytes' CUDA kernels round a few values
    # differently from its CPU path (measured on an H200: FP4 99.50% of codes agree; LLM.int8, which scales by a
    # reciprocal on CUDA, 99.995%), and HQQ's optimiser may round a rare tie differently.
    if spec.startswith(("hqq", "fp4")):
        assert agree > 0.99, agree
    elif spec == "int8":
        assert agree > 0.9999, agree
    else:
        assert agree == 1.0, agree
    batch = tokenizer(["Alice moved to", "The council"], return_tensors="pt", padding=True).to("cuda")
    with torch.no_grad():
        logits = cuda_model(**batch).logits
        out = cuda_model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert logits.device.type == "cuda" and torch.isfinite(logits).all()
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)


def test_bf16_model_quantizes_on_cuda(tiny_model_dir):
    from qrunlearn.quant import load_quantized

    for spec in ("nf4", "int8", "rtn:w4g64"):
        model, tokenizer = load_quantized(tiny_model_dir, spec, device="cuda")  # bf16 on CUDA by default
        batch = tokenizer(["Alice moved to"], return_tensors="pt").to("cuda")
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == batch["input_ids"].shape[1] + 3
