import pytest
import torch
from torch import nn

from qrunlearn.errors import UserError
from qrunlearn.quant import quantize_model, quantized_codes
from qrunlearn.quant.rtn import RTNLinear, rtn_quantize_weight


def _weight(out=96, inp=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=gen) * 0.05


@pytest.mark.parametrize("bits, group, sym", [(4, 64, False), (4, None, False), (8, 64, False), (2, 32, False),
                                              (3, 64, False), (4, 64, True), (8, None, True)])
def test_rtn_matches_torchao_intx_exactly(bits, group, sym):
    torchao = pytest.importorskip("torchao")
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerAxis, PerGroup, quantize_

    weight = _weight()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight)
    config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"),
                                  granularity=PerGroup(group) if group else PerAxis(0),
                                  mapping_type=MappingType.SYMMETRIC if sym else MappingType.ASYMMETRIC)
    quantize_(linear, config)
    ours = rtn_quantize_weight(weight, bits, group, sym)
    assert torch.equal(ours.dequant, linear.weight.dequantize().float()), torchao.__version__
    assert torch.equal(ours.codes, linear.weight.qdata.to(torch.int64))


def test_codes_range_and_step_bound_the_error():
    weight = _weight()
    for bits in (2, 4, 8):
        q = rtn_quantize_weight(weight, bits, 64, False)
        assert q.codes.min() >= -(2 ** (bits - 1)) and q.codes.max() <= 2 ** (bits - 1) - 1
        # round-to-nearest: every weight within half a step of its level (the range includes 0, so no clipping)
        assert torch.all((q.dequant - weight).abs() <= q.step / 2 + 1e-7)
        assert len(torch.unique(q.codes)) > 2 ** bits - 3  # the grid is used
    per_channel = rtn_quantize_weight(weight, 4, None, False)
    assert torch.all(per_channel.step == per_channel.step[:, :1])  # one scale per row


def test_rtn_linear_is_real_integer_storage():
    weight = _weight()
    linear = nn.Linear(128, 96)
    linear.weight.data.copy_(weight)
    layer = RTNLinear(linear, 4, 64, False)
    assert layer.codes.dtype == torch.int8 and layer.zero_point.dtype == torch.int8
    # the forward weight is exactly (codes - zero) * scale from the stored integers
    manual = ((layer.codes.float().view(96, 2, 64) - layer.zero_point.float().unsqueeze(-1))
              * layer.scale.unsqueeze(-1)).view(96, 128)
    assert torch.equal(layer.weight, manual)
    assert torch.equal(layer.weight, rtn_quantize_weight(weight, 4, 64, False).dequant)
    x = torch.randn(3, 128)
    assert torch.allclose(layer(x), x @ manual.T + linear.bias, atol=1e-6)


def test_quantize_model_touches_only_block_linears(tiny_model):
    embed = tiny_model.get_input_embeddings().weight.detach().clone()
    head = tiny_model.lm_head.weight.detach().clone()
    fp = {n: m.weight.detach().clone() for n, m in tiny_model.named_modules() if isinstance(m, nn.Linear)}
    quantize_model(tiny_model, "rtn:w4g64")
    replaced = [n for n, m in tiny_model.named_modules() if isinstance(m, RTNLinear)]
    assert len(replaced) == 2 * 7  # q k v o gate up down per block, 2 blocks
    assert isinstance(tiny_model.lm_head, nn.Linear) and torch.equal(tiny_model.lm_head.weight, head)
    assert torch.equal(tiny_model.get_input_embeddings().weight, embed)
    codes = quantized_codes(tiny_model, "rtn:w4g64")
    for name in replaced:
        assert torch.equal(codes[name], rtn_quantize_weight(fp[name], 4, 64, False).codes)


def test_group_that_does_not_divide_a_width_is_an_error(tiny_model):
    # tiny preset: hidden 64, intermediate 192 -> g128 divides neither down_proj's 192 nor q_proj's 64
    with pytest.raises(UserError, match=r"group size 128 does not divide in_features 64 of layer model\.layers\.0"):
        quantize_model(tiny_model, "rtn:w4g128")
    assert not any(isinstance(m, RTNLinear) for m in tiny_model.modules())  # nothing half-quantized
