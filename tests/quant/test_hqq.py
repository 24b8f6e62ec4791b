import copy

import pytest
import torch

pytest.importorskip("hqq")

from qrunlearn.quant import quantize_model, quantize_weight, quantized_codes  # noqa: E402


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_hqq_weight_codes_and_dequant(bits):
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    q = quantize_weight(weight, f"hqq:w{bits}g64")
    assert q.codes.shape == weight.shape and q.codes.min() >= 0 and q.codes.max() <= 2 ** bits - 1
    error = (q.dequant - weight).abs().mean()
    assert error < q.step.mean()  # within a step on average; HQQ optimises zero/scale, so not strictly < step/2
    if bits == 8:
        assert error < 1e-3


def test_hqq_model_codes_match_per_weight(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    fp = copy.deepcopy(model)
    quantize_model(model, "hqq:w4g64")
    stored, computed = quantized_codes(model, "hqq:w4g64"), quantized_codes(fp, "hqq:w4g64")
    assert len(stored) == 14 and all(torch.equal(stored[n], computed[n]) for n in stored)
    batch = tokenizer(["Alice moved to"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
