import copy

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from qrunlearn.errors import UserError
from qrunlearn.quant import quantize_model
from qrunlearn.quant.fake import (
    blockwise_4bit_codes,
    blockwise_4bit_dequantize,
    code_table,
    fake_quant_layers,
    fake_quantize,
    fake_quantized,
)
from qrunlearn.quant.rtn import RTNLinear, rtn_quantize_weight
from qrunlearn.quant.spec import parse_spec
from qrunlearn.unlearn.lora import merged_copy, wrap_lora


def _weight(out=96, inp=128, seed=0, dtype=torch.float32):
    return (torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


def _batch(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


# --- RTN: the very dequantized weight of quant/rtn.py -------------------------------------------------------------

@pytest.mark.parametrize("spec", ["rtn:w4g64", "rtn:w4", "rtn:w8g32", "rtn:w2g64", "rtn:w3g128", "rtn:w4g64:sym",
                                  "rtn:w8:sym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rtn_equals_rtn_dequant_bit_for_bit(spec, dtype):
    weight = _weight(dtype=dtype)
    parsed = parse_spec(spec)
    fake = fake_quantize(weight, parsed)
    assert fake.dtype == dtype and fake.shape == weight.shape
    real = rtn_quantize_weight(weight, parsed.bits, parsed.group_size, parsed.symmetric).dequant
    assert torch.equal(fake.float(), real)
    assert not torch.equal(fake, weight)  # it did quantize
    # and what an RTNLinear built from this weight computes with
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=dtype)
    linear.weight.data.copy_(weight)
    assert torch.equal(fake, RTNLinear(linear, parsed.bits, parsed.group_size, parsed.symmetric).weight)


# --- NF4 / FP4: bitsandbytes' codes and dequantized values --------------------------------------------------------

def _bnb_codes_and_dequant(weight: torch.Tensor, method: str):
    bnb = pytest.importorskip("bitsandbytes")
    from qrunlearn.quant.bnb import _unpack_4bit

    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=False,
                                                 quant_type=method, quant_storage=torch.uint8)
    codes = _unpack_4bit(packed, weight.numel()).reshape(weight.shape)
    # bnb's dequantization by definition: code value * block absmax, in fp32, cast to the weight's dtype
    per_element = state.absmax.repeat_interleave(64)[:weight.numel()]
    dequant = (state.code[codes.reshape(-1)] * per_element).reshape(weight.shape).to(weight.dtype)
    return codes, dequant, packed, state


def _tie_weight(method: str) -> torch.Tensor:
    """Rows of 64 built to hit the corner cases: every midpoint between two levels (a tie), every level, exact
    zeros, +-tiny values around FP4's +0/-0 pair, an all-zero block, constant blocks."""
    table = code_table(method, torch.device("cpu"))
    special = torch.cat([torch.tensor([1.0]), table.bounds, -table.bounds, table.values,
                         torch.tensor([0.0, -0.0, 1e-9, -1e-9, 2e-3, -2e-3])])
    first = torch.cat([special, torch.zeros(128 - special.numel())]).reshape(2, 64)
    return torch.cat([first, torch.zeros(1, 64), torch.full((1, 64), 0.3), torch.full((1, 64), -0.3)])


@pytest.mark.parametrize("method", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(96, 128), (7, 33), (5, 100), (130, 96), (1, 10), (3, 64)])
def test_4bit_codes_and_values_equal_bitsandbytes(method, dtype, shape):
    weight = _weight(*shape, seed=shape[0], dtype=dtype)
    codes, dequant, _, _ = _bnb_codes_and_dequant(weight, method)
    assert torch.equal(blockwise_4bit_codes(weight, method), codes)
    fake = fake_quantize(weight, method)
    assert fake.dtype == dtype and torch.equal(fake, dequant)


@pytest.mark.parametrize("method", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_4bit_ties_zeros_and_constant_blocks_equal_bitsandbytes(method, dtype):
    weight = _tie_weight(method).to(dtype)
    codes, dequant, _, _ = _bnb_codes_and_dequant(weight, method)
    assert torch.equal(blockwise_4bit_codes(weight, method), codes)
    assert torch.equal(blockwise_4bit_dequantize(weight, method), dequant)
    # the same values with a partial last block (numel 319: the tail is divided, not multiplied, by its absmax)
    tail = weight.reshape(-1)[:319].reshape(11, 29)
    codes, dequant, _, _ = _bnb_codes_and_dequant(tail, method)
    assert torch.equal(blockwise_4bit_codes(tail, method), codes)
    assert torch.equal(fake_quantize(tail, method), dequant)


def _division_sensitive_pairs(method: str, count: int = 4) -> list[tuple[float, float]]:
    """(absmax, x) pairs for which x * (1 / absmax) and x / absmax land in different buckets (one ulp across a
    midpoint): bnb scales full blocks the first way and the last partial block the second way."""
    bounds = code_table(method, torch.device("cpu")).bounds
    absmax = torch.rand(4000, generator=torch.Generator().manual_seed(0)) * 0.1 + 0.01
    pairs = []
    for bound in bounds[bounds > 0]:
        x = bound * absmax
        for _ in range(3):
            by_division = torch.bucketize(x / absmax, bounds)
            by_reciprocal = torch.bucketize(x * (1.0 / absmax), bounds)
            hits = (by_division != by_reciprocal).nonzero().flatten()
            if len(hits):
                pairs.append((absmax[hits[0]].item(), x[hits[0]].item()))
                break
            x = torch.nextafter(x, torch.ones_like(x))
    assert len(pairs) >= count
    return pairs[:count]


@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_4bit_scales_full_blocks_by_reciprocal_and_the_tail_by_division(method):
    pairs = _division_sensitive_pairs(method)
    blocks = torch.zeros(len(pairs), 64)
    for row, (absmax, x) in enumerate(pairs):
        blocks[row, :2] = torch.tensor([absmax, x])
    absmax, x = pairs[0]
    with_tail = torch.cat([blocks.reshape(-1), torch.tensor([absmax, x])]).reshape(2, -1)  # [2, 129]
    for weight in (blocks, with_tail):
        codes, dequant, _, _ = _bnb_codes_and_dequant(weight, method)
        assert torch.equal(blockwise_4bit_codes(weight, method), codes)
        assert torch.equal(fake_quantize(weight, method), dequant)


@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_4bit_equals_bnb_dequantize_kernel(method):
    """Against bnb's own `dequantize_4bit` kernel too. Only where rows are whole blocks: bnb 0.50's native CPU
    kernel (used for even row lengths) locates blocks per row, so for e.g. [130, 96] it disagrees with its own
    quantize_4bit layout; the other tests compare with bnb's definition, code value * block absmax."""
    bnb = pytest.importorskip("bitsandbytes")
    for dtype in (torch.float32, torch.bfloat16):
        weight = _weight(64, 192, seed=3, dtype=dtype)
        _, _, packed, state = _bnb_codes_and_dequant(weight, method)
        assert torch.equal(fake_quantize(weight, method), bnb.functional.dequantize_4bit(packed, state))


# --- straight-through gradient -------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["rtn:w4g64", "nf4", "fp4"])
def test_gradient_is_straight_through(spec):
    weight = _weight().requires_grad_()
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    target = torch.randn(5, 96, generator=torch.Generator().manual_seed(2))

    def loss(w: torch.Tensor) -> torch.Tensor:
        return ((torch.tanh(x @ w.T) - target) ** 2).sum()

    loss(fake_quantize(weight, spec)).backward()
    at_q = fake_quantize(weight.detach(), spec).clone().requires_grad_()
    loss(at_q).backward()
    assert torch.equal(weight.grad, at_q.grad)
    # not the full-precision gradient: the loss really was evaluated at Q(W)
    plain = weight.detach().clone().requires_grad_()
    loss(plain).backward()
    assert not torch.allclose(weight.grad, plain.grad, atol=1e-4)


# --- the context manager on a tiny Llama ---------------------------------------------------------------------------

def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("spec", ["rtn:w4g64", "rtn:w3:sym"])
def test_model_under_fake_rtn_equals_rtn_quantized_model(tiny_model, spec):
    ids = _batch(tiny_model.config.vocab_size)
    before = _snapshot(tiny_model)
    params = dict(tiny_model.named_parameters())
    quantized = quantize_model(copy.deepcopy(tiny_model), spec)
    with torch.no_grad():
        want = quantized(ids).logits
        fp = tiny_model(ids).logits
        with fake_quantized(tiny_model, spec) as switch:
            got = tiny_model(ids).logits
            with switch.full_precision():
                assert torch.equal(tiny_model(ids).logits, fp)
    assert len(switch.layers) == 14
    assert torch.equal(got, want) and not torch.equal(got, fp)
    after = tiny_model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert dict(tiny_model.named_parameters()) == params  # the same Parameter objects
    assert all("forward" not in m.__dict__ for m in tiny_model.modules())
    with torch.no_grad():
        assert torch.equal(tiny_model(ids).logits, fp)


@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_model_under_fake_4bit_matches_bnb_quantized_model(tiny_model, method):
    pytest.importorskip("bitsandbytes")
    ids = _batch(tiny_model.config.vocab_size, seed=1)
    quantized = quantize_model(copy.deepcopy(tiny_model), method)
    with torch.no_grad():
        want = quantized(ids).logits
        with fake_quantized(tiny_model, method):
            got = tiny_model(ids).logits
        fp = tiny_model(ids).logits
    # on CPU bnb's Linear4bit dequantizes (the same values) and calls F.linear: the logits agree exactly
    assert torch.equal(got, want) and not torch.allclose(got, fp, atol=1e-3)


def test_backward_under_fake_quant_is_the_gradient_at_the_quantized_weights(tiny_model):
    ids = _batch(tiny_model.config.vocab_size, seed=2)
    tiny_model.train()
    with fake_quantized(tiny_model, "rtn:w4g64"):
        loss = tiny_model(ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad for n, p in tiny_model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # the q_proj gradient is the gradient at the quantized weights: same graph with the weights replaced by Q(W)
    reference = quantize_model(copy.deepcopy(tiny_model), "rtn:w4g64")
    reference.train()
    q_proj = reference.model.layers[0].self_attn.q_proj
    dequant = q_proj.weight.clone().requires_grad_()
    q_proj.weight = dequant
    reference(ids, labels=ids).loss.backward()
    assert torch.allclose(grads["model.layers.0.self_attn.q_proj.weight"], dequant.grad, atol=1e-6, rtol=1e-4)


# --- LoRA: Q(W0 + s B A) ------------------------------------------------------------------------------------------

def _lora_model(model: nn.Module, seed: int = 0, dropout: float = 0.0):
    peft_model, _ = wrap_lora(model, r=4, alpha=8, dropout=dropout, targets=None)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; a trained adapter does not
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return peft_model


@pytest.mark.parametrize("spec, dtype", [("rtn:w4g64", torch.float32), ("rtn:w4g64", torch.bfloat16),
                                         ("nf4", torch.float32)])
def test_lora_fake_quant_equals_merged_then_quantized(tiny_model, spec, dtype):
    if spec == "nf4":
        pytest.importorskip("bitsandbytes")
    peft_model = _lora_model(tiny_model.to(dtype))  # bf16: peft keeps the adapters in fp32, merge rounds to bf16
    ids = _batch(tiny_model.config.vocab_size, seed=3)
    before = _snapshot(peft_model)
    deployed = quantize_model(merged_copy(peft_model), spec)
    with torch.no_grad():
        want = deployed(ids).logits
        with fake_quantized(peft_model, spec) as switch:
            got = peft_model(ids).logits
    assert len(switch.layers) == 14 and all(name.endswith("_proj") for name in switch.layers)
    assert torch.equal(got, want)
    # quantizing the base weights alone (ignoring the adapters) is a different model
    base_only = quantize_model(copy.deepcopy(peft_model).unload(), spec)
    with torch.no_grad():
        assert not torch.allclose(base_only(ids).logits, want, atol=1e-4)
    after = peft_model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_lora_gradients_reach_the_adapters_through_the_merged_weight(tiny_model):
    peft_model = _lora_model(tiny_model, seed=1)
    ids = _batch(tiny_model.config.vocab_size, seed=4)
    layer = peft_model.base_model.model.model.layers[1].mlp.down_proj
    with fake_quantized(peft_model, "rtn:w4g64"):
        peft_model(ids, labels=ids).loss.backward()
    a, b, scale = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    # reference: the merged model, quantized, with this one layer's Q(W) as a leaf; chain rule through W0 + s B A
    deployed = quantize_model(merged_copy(peft_model), "rtn:w4g64")
    deployed.train()
    q_layer = deployed.model.layers[1].mlp.down_proj
    leaf = q_layer.weight.clone().requires_grad_()
    q_layer.weight = leaf
    deployed(ids, labels=ids).loss.backward()
    assert torch.allclose(a.grad, scale * b.detach().T @ leaf.grad, atol=1e-7, rtol=1e-4)
    assert torch.allclose(b.grad, scale * leaf.grad @ a.detach().T, atol=1e-7, rtol=1e-4)
    frozen = [p for n, p in peft_model.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in frozen)


def test_lora_full_precision_switch_runs_peft_forward_with_dropout(tiny_model):
    peft_model = _lora_model(tiny_model, dropout=0.5)
    peft_model.train()
    ids = _batch(tiny_model.config.vocab_size, seed=5)
    with torch.no_grad(), fake_quantized(peft_model, "rtn:w8g64") as switch:
        fake_a, fake_b = peft_model(ids).logits, peft_model(ids).logits
        with switch.full_precision():
            fp_a, fp_b = peft_model(ids).logits, peft_model(ids).logits
    assert torch.equal(fake_a, fake_b)  # no dropout on the merged path
    assert not torch.equal(fp_a, fp_b)  # peft's own forward, dropout active


def test_gpt2_conv1d_layers_plain_and_lora():
    """GPT-2 stores its linears as transposed Conv1D weights (peft: fan_in_fan_out); Q applies to the [out, in]
    weight exactly as `quantize_model` sees it."""
    config = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    ids = _batch(128, seed=6)
    deployed = quantize_model(copy.deepcopy(model), "rtn:w4g64")
    with torch.no_grad(), fake_quantized(model, "rtn:w4g64") as switch:
        assert len(switch.layers) == 8 and torch.equal(model(ids).logits, deployed(ids).logits)
    peft_model = _lora_model(model)
    deployed = quantize_model(merged_copy(peft_model), "rtn:w4g64")
    with torch.no_grad(), fake_quantized(peft_model, "rtn:w4g64"):
        assert torch.equal(peft_model(ids).logits, deployed(ids).logits)


# --- errors ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["int8", "hqq:w4g64", "gptq:w4g128", "fp"])
def test_unsupported_spec_is_one_line_user_error(spec, tiny_model):
    with pytest.raises(UserError) as err:
        fake_quantize(_weight(), spec)
    message = str(err.value)
    assert "\n" not in message and message.startswith("quantization-aware unlearning supports")
    assert message.endswith(f"not {parse_spec(spec).label}")
    with pytest.raises(UserError), fake_quantized(tiny_model, spec):
        pass


def test_bad_inputs_are_user_errors(tiny_model):
    with pytest.raises(UserError, match="unknown quantization spec 'rtn:w4x'"):
        fake_quantize(_weight(), "rtn:w4x")
    with pytest.raises(UserError, match=r"group size 64 does not divide in_features 100"):
        fake_quantize(_weight(8, 100), "rtn:w4g64")
    with pytest.raises(UserError, match=r"group size 128 does not divide in_features 64 of layer model\.layers\.0"):
        with fake_quantized(tiny_model, "rtn:w4g128"):
            pass
    with pytest.raises(UserError, match="already quantized"):
        fake_quant_layers(quantize_model(copy.deepcopy(tiny_model), "rtn:w4g64"))
    with fake_quantized(tiny_model, "nf4"):
        with pytest.raises(UserError, match="nested"), fake_quantized(tiny_model, "nf4"):
            pass
        assert all("forward" in m.__dict__ for m in fake_quant_layers(tiny_model).values())  # outer still on
    assert all("forward" not in m.__dict__ for m in tiny_model.modules())


def test_model_is_restored_after_an_exception(tiny_model):
    ids = _batch(tiny_model.config.vocab_size)
    with torch.no_grad():
        fp = tiny_model(ids).logits
    with pytest.raises(RuntimeError, match="boom"), fake_quantized(tiny_model, "fp4"):
        raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ and "_qrunlearn_fake_quant" not in m.__dict__
               for m in tiny_model.modules())
    with torch.no_grad():
        assert torch.equal(tiny_model(ids).logits, fp)
