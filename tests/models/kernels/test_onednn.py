"""oneDNN routing of float32 linear layers: which calls it takes, and that it computes the same thing."""

from __future__ import annotations

import pytest
import torch

from qrunlearn.models.kernels import onednn
from qrunlearn.models.kernels.onednn import onednn_linear

pytestmark = pytest.mark.skipif(onednn.ONEDNN_LINEAR is None, reason="this PyTorch build has no oneDNN linear")


@pytest.fixture
def routed_calls(monkeypatch) -> list[tuple[int, ...]]:
    """Input shapes of the calls that reached oneDNN."""
    calls: list[tuple[int, ...]] = []
    real = onednn.ONEDNN_LINEAR

    def spy(*args):
        calls.append(tuple(args[0].shape))
        return real(*args)

    monkeypatch.setattr(onednn, "ONEDNN_LINEAR", spy)
    return calls


def test_inference_linears_are_routed_and_agree(routed_calls):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        expected = layer(x)
        with onednn_linear() as routed:
            got = layer(x)
            unbiased = torch.nn.functional.linear(x[0], layer.weight)
    assert routed and routed_calls == [(3, 7, 64), (7, 64)]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unbiased, x[0] @ layer.weight.T, rtol=1e-5, atol=1e-5)


def test_other_dtypes_and_disabled_are_left_alone(routed_calls):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    with onednn_linear():
        with torch.no_grad():
            torch.nn.functional.linear(x.double(), layer.weight.double())
            torch.nn.functional.linear(x.bfloat16(), layer.weight.bfloat16())
    with torch.no_grad(), onednn_linear(enabled=False) as routed:
        layer(x)
    assert not routed and routed_calls == []


def test_a_llama_forward_agrees_with_the_default_blas(routed_calls):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 200, (2, 33))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        with onednn_linear():
            got = model(input_ids=ids).logits
    assert len(routed_calls) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, then the head
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_training_linears_give_the_same_gradients(routed_calls):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    x = torch.randn(3, 7, 64, requires_grad=True)
    grad_out = torch.randn(3, 7, 48)
    expected = torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), grad_out)
    with onednn_linear():
        got = torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), grad_out)
    # the forward and both backward products went through oneDNN
    assert routed_calls == [(3, 7, 64), (3, 7, 48), (48, 21)]
    for mine, reference in zip(got, expected):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5)


def test_autocast_and_frozen_inputs_are_left_alone(routed_calls):
    layer = torch.nn.Linear(16, 8)
    with onednn_linear(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 16)).dtype == torch.bfloat16  # autocast still casts
    assert routed_calls == []
    layer.requires_grad_(False)
    with onednn_linear():
        layer(torch.randn(2, 16))  # nothing needs a gradient: the plain oneDNN product
    assert routed_calls == [(2, 16)]


class _Spy:
    """Stands in for oneDNN's linear op and counts its fused (binary) calls."""

    def __init__(self, real) -> None:
        self.real, self.fused = real, 0

    def __call__(self, *args):
        return self.real(*args)

    def binary(self, *args):
        self.fused += 1
        return self.real.binary(*args)


def _llama(layers: int = 2) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=176, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_fused_gated_mlps_give_the_plain_logits_and_are_restored(monkeypatch):
    spy = _Spy(onednn.ONEDNN_LINEAR)
    monkeypatch.setattr(onednn, "ONEDNN_LINEAR", spy)
    model = _llama(layers=3)
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        expected = model(ids).logits
        with onednn.fused_gated_mlp(model) as switched:
            got = model(ids).logits
    assert switched == 3 and spy.fused == 3  # one fused product per layer and pass
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # silu(gate) * up written out by hand, as a check that the fused op computes that and not, e.g., up * gate
    mlp = model.model.layers[0].mlp
    x = torch.randn(5, 64)
    with torch.no_grad(), onednn.fused_gated_mlp(model):
        fused = mlp(x)
    manual = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(fused, manual, rtol=1e-5, atol=1e-5)
    assert all("forward" not in layer.mlp.__dict__ for layer in model.model.layers)


def test_fused_gated_mlps_leave_training_adapters_and_hooks_alone(monkeypatch):
    spy = _Spy(onednn.ONEDNN_LINEAR)
    monkeypatch.setattr(onednn, "ONEDNN_LINEAR", spy)
    model = _llama(layers=2)
    ids = torch.randint(0, 97, (1, 12))
    with onednn.fused_gated_mlp(model):
        model(ids).logits.sum().backward()  # autograd on: the plain path
    assert spy.fused == 0 and model.model.layers[0].mlp.gate_proj.weight.grad is not None

    class Adapted(torch.nn.Linear):  # a projection that is not a plain linear layer (an adapter, a quantized layer)
        pass

    first = model.model.layers[0].mlp
    adapted = Adapted(64, 176, bias=False)
    adapted.load_state_dict(first.gate_proj.state_dict())
    first.gate_proj = adapted
    hooked = model.model.layers[1].mlp
    original = hooked.forward
    hooked.forward = lambda x: original(x)  # an instance-level forward, as accelerate's hooks set
    hook = hooked.forward
    with torch.no_grad(), onednn.fused_gated_mlp(model) as switched:
        model(ids)
    assert switched == 1 and spy.fused == 1
    assert hooked.forward is hook and "forward" not in first.__dict__
    with onednn.fused_gated_mlp(model, enabled=False) as switched:
        assert switched == 0
