"""QuantizedLinear behaves like nn.Linear with the dequantized weight (reference: torch's F.linear)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant import QuantizedLinear, get_scheme

SCHEMES = ("int4", "int8", "nf4")


def linear(bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(256, 64, bias=bias)


@pytest.mark.parametrize("name", SCHEMES)
def test_from_float_matches_linear_with_the_dequantized_weight(name):
    scheme = get_scheme(name)
    original = linear()
    quantized = QuantizedLinear.from_float(original, scheme, dtype=torch.float32)
    weight = scheme.dequantize(scheme.quantize(original.weight.detach()))
    x = torch.randn(2, 5, 256)
    y = quantized(x)
    ref = F.linear(x.double(), weight.double(), original.bias.detach().double())
    mag = x.double().abs() @ weight.double().abs().T + original.bias.detach().double().abs()
    assert y.shape == (2, 5, 64) and y.dtype == torch.float32
    assert ((y.double() - ref).abs() <= 2 * 257 * 2.0**-24 * mag).all()


@pytest.mark.parametrize("name", SCHEMES)
def test_from_packed_equals_from_float_and_keeps_no_weights_in_state_dict(name):
    scheme = get_scheme(name)
    original = linear(bias=False, seed=1)
    packed = scheme.quantize(original.weight.detach())
    a = QuantizedLinear.from_packed(packed, scheme, "cpu")
    b = QuantizedLinear.from_float(original, scheme)
    x = torch.randn(3, 256).bfloat16()
    assert torch.equal(a(x), b(x))
    assert a.bias is None and a.state_dict() == {}
    assert (a.in_features, a.out_features) == (256, 64)
    assert name in repr(a) and "in_features=256" in repr(a)


def test_from_float_refuses_a_shape_the_scheme_cannot_take():
    with pytest.raises(ValueError, match="divisible by the group size 128"):
        QuantizedLinear.from_float(nn.Linear(100, 64), get_scheme("int4"))


def test_bias_of_the_wrong_size_is_refused():
    scheme = get_scheme("int8")
    packed = scheme.quantize(torch.randn(64, 256))
    with pytest.raises(ValueError, match=r"bias should have shape \[64\]"):
        QuantizedLinear.from_packed(packed, scheme, "cpu", bias=torch.zeros(65))
