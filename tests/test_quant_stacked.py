"""quant.stacked: experts' prepared weights in shared blocks, gathered by device index.

Checked against each expert prepared on its own (the same kernel on the same bytes must give the
same product, exactly), for every scheme and CPU layout, with rows whose size is no multiple of
the 64-byte alignment (int8's CPU kernel crashes on misaligned codes).
"""

from __future__ import annotations

import pytest
import torch

from quant import get_scheme, slice_packed, stack_prepared
from quant.base import KERNEL_ALIGNMENT

EXPERTS = 5
CASES = [("int8", 40, 20, torch.float32), ("int8", 40, 20, torch.bfloat16), ("int4", 48, 128, torch.float32),
         ("int4", 48, 128, torch.bfloat16), ("nf4", 96, 64, torch.float32), ("nf4", 96, 64, torch.bfloat16)]


@pytest.mark.parametrize(("name", "out_features", "in_features", "dtype"), CASES)
def test_gathered_experts_multiply_exactly_as_each_prepared_alone(name, out_features, in_features, dtype):
    scheme = get_scheme(name)
    gen = torch.Generator().manual_seed(0)
    packed = scheme.quantize(torch.randn(EXPERTS, out_features, in_features, generator=gen))
    alone = [scheme.prepare(slice_packed(packed, e), "cpu", dtype) for e in range(EXPERTS)]
    stacked = stack_prepared((scheme.prepare(slice_packed(packed, e), "cpu", dtype) for e in range(EXPERTS)), EXPERTS)
    x = torch.randn(1, in_features, generator=gen).to(dtype)
    for e in range(EXPERTS):
        assert torch.equal(scheme.matmul(x, stacked.experts[e]), scheme.matmul(x, alone[e]))
        assert all(t.data_ptr() % KERNEL_ALIGNMENT == 0 for t in stacked.experts[e].tensors.values())
    ids = torch.tensor([3, 0, 3, 4])  # repeats are allowed: two tokens' choices may meet
    for j, tensors in enumerate(stacked.gather(ids)):
        assert all(t.data_ptr() % KERNEL_ALIGNMENT == 0 for t in tensors.values())
        got = scheme.matmul(x, stacked.experts[0], tensors)
        assert torch.equal(got, scheme.matmul(x, alone[int(ids[j])]))


def test_stacking_checks_it_got_every_expert():
    scheme = get_scheme("int8")
    packed = scheme.quantize(torch.randn(2, 16, 16))
    with pytest.raises(ValueError, match="expected 3 prepared weights, got 2"):
        stack_prepared((scheme.prepare(slice_packed(packed, e), "cpu", torch.float32) for e in range(2)), 3)
