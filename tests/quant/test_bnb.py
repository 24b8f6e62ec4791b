import copy

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")
import bitsandbytes as bnb  # noqa: E402

from qrunlearn.quant import quantize_model, quantize_weight, quantized_codes  # noqa: E402
from qrunlearn.quant.bnb import _unpack_4bit  # noqa: E402


def test_unpack_4bit_high_nibble_first():
    packed = torch.tensor([[0x1F], [0xA3]], dtype=torch.uint8)
    assert _unpack_4bit(packed, 4).tolist() == [1, 15, 10, 3]
    assert _unpack_4bit(packed, 3).tolist() == [1, 15, 10]


@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_4bit_weight_codes_reproduce_bnb_dequant(method):
    weight = torch.randn(192, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    q = quantize_weight(weight, method)
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type=method)
    # codes index bnb's code table, scaled by the block absmax: exactly bnb's own dequantization
    manual = (state.code[q.codes.reshape(-1, 64)] * state.absmax.reshape(-1, 1)).reshape(weight.shape)
    assert torch.equal(manual, q.dequant)
    assert torch.equal(q.dequant, bnb.functional.dequantize_4bit(packed, state))
    assert q.codes.min() >= 0 and q.codes.max() <= 15
    assert (q.dequant - weight).abs().max() <= q.step.max()


def test_int8_codes_are_rowwise_absmax():
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.02
    q = quantize_weight(weight, "int8")
    absmax = weight.half().float().abs().amax(dim=1, keepdim=True)
    assert torch.equal(q.codes, torch.round(weight.half().float() * 127 / absmax).to(torch.int64))
    assert torch.allclose(q.dequant, q.codes.float() * absmax / 127, atol=1e-6)


@pytest.mark.parametrize("method, layer_type", [("nf4", "Linear4bit"), ("fp4", "Linear4bit"),
                                                ("int8", "Linear8bitLt")])
def test_quantized_model_codes_and_forward(tiny_model_and_tokenizer, method, layer_type):
    model, tokenizer = tiny_model_and_tokenizer
    fp = copy.deepcopy(model)
    quantize_model(model, method)
    names = [n for n, m in model.named_modules() if type(m).__name__ == layer_type]
    assert len(names) == 14 and type(model.lm_head) is nn.Linear
    stored = quantized_codes(model, method)  # read from the bnb layers, before any forward
    computed = quantized_codes(fp, method)  # computed from the fp weights
    assert all(torch.equal(stored[n], computed[n]) for n in names)
    # the quantized model = the fp model with each block weight replaced by its dequantized value
    reference = copy.deepcopy(fp)
    for name in names:
        reference.get_submodule(name).weight.data.copy_(quantize_weight(fp.get_submodule(name).weight, method).dequant)
    batch = tokenizer(["Alice moved to", "The council of"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got, want = model(**batch).logits, reference(**batch).logits
        # int8 also quantizes activations (fp16 + outlier split), so it only approximates the weight-only reference
        assert torch.allclose(got, want, atol=1e-4 if method != "int8" else 0.05)
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)
    if method != "int8":  # no CPU repacking happened: codes still readable after forward + generate
        assert all(torch.equal(quantized_codes(model, method)[n], computed[n]) for n in names)
