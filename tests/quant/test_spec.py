import pytest

from qrunlearn.errors import UserError
from qrunlearn.quant.spec import QuantSpec, parse_spec


@pytest.mark.parametrize(
    "text, method, bits, group, sym, label",
    [
        ("rtn:w4g128", "rtn", 4, 128, False, "rtn:w4g128"),
        ("rtn:w8", "rtn", 8, None, False, "rtn:w8"),
        ("RTN:w4g64:sym", "rtn", 4, 64, True, "rtn:w4g64:sym"),
        ("rtn:w2g32", "rtn", 2, 32, False, "rtn:w2g32"),
        ("nf4", "nf4", 4, 64, True, "nf4"),
        ("fp4", "fp4", 4, 64, True, "fp4"),
        ("int8", "int8", 8, None, True, "int8"),
        ("hqq:w3g64", "hqq", 3, 64, False, "hqq:w3g64"),
        ("gptq:w4g128", "gptq", 4, 128, True, "gptq:w4g128"),
        ("awq:w4g64", "awq", 4, 64, False, "awq:w4g64"),
        ("gguf:q4_k_m", "gguf", 4, None, False, "gguf:q4_k_m"),
        ("GGUF:Q8_0", "gguf", 8, None, False, "gguf:q8_0"),
        ("gguf:iq4_xs", "gguf", 4, None, False, "gguf:iq4_xs"),
        ("gguf:f32", "gguf", 32, None, False, "gguf:f32"),
        ("fp", "fp", None, None, False, "fp"),
        ("none", "fp", None, None, False, "fp"),
    ],
)
def test_parse_spec_fields_and_label(text, method, bits, group, sym, label):
    spec = parse_spec(text)
    assert (spec.method, spec.bits, spec.group_size, spec.symmetric, spec.label) == (method, bits, group, sym, label)
    assert parse_spec(spec.label) == spec  # the label round-trips


def test_spec_is_frozen_and_hashable():
    spec = parse_spec("nf4")
    with pytest.raises(AttributeError):
        spec.bits = 8
    assert {spec: 1}[QuantSpec("nf4", 4, 64, True)] == 1


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("marlin:w4", "unknown quantization spec"),
        ("awq:w4g", "unknown quantization spec"),
        ("awq:w1g64", "1 bits not supported"),
        ("rtn", "unknown quantization spec"),
        ("rtn:w4g", "unknown quantization spec"),
        ("nf4:w4", "unknown quantization spec"),
        ("rtnw4", "unknown quantization spec"),
        ("rtn:w9", "9 bits not supported"),
        ("rtn:w1g64", "1 bits not supported"),
        ("hqq:w5g64", "5 bits not supported"),
        ("hqq:w4", "unknown quantization spec"),
        ("rtn:w4g0", "group size must be positive"),
        ("gguf:q4_k_x", "unknown llama.cpp type 'q4_k_x'"),
        ("gguf", "unknown llama.cpp type ''"),
        ("gguf:q4_k_m:sym", "unknown llama.cpp type"),
        ("gguf:iq2_xxs", "only with an importance matrix"),
    ],
)
def test_bad_specs_raise_one_line_user_error(text, fragment):
    with pytest.raises(UserError) as err:
        parse_spec(text)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)
