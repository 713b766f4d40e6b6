"""int4 (tinygemm recipe): error bound derived from the scheme, and torchao's primitives as reference."""

import os
import subprocess
import sys

import pytest
import torch
from torchao.quantization.utils import (
    get_groupwise_affine_qparams,
    groupwise_affine_dequantize_tensor_from_qparams,
    groupwise_affine_quantize_tensor_from_qparams,
)

from quant import get_scheme
from quant.nibbles import unpack_nibbles

GROUP = 128
BF16_UNIT = 2.0**-8  # relative rounding error of a bfloat16 (8 significant bits)
SCHEME = get_scheme("int4")


def awkward_weight(seed=0):
    """Groups of every kind: zero-mean, far-off-zero with a tiny range (where bf16 rounding of the
    zero point matters), constant, all-zero, and large magnitudes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 512, generator=g) * torch.rand(64, 1, generator=g) * 3
    w[8:16] = 1 + 0.01 * torch.randn(8, 512, generator=g)  # offset 1, range ~0.05
    w[16, :GROUP] = 0.3  # constant group
    w[17] = 0.0  # zero row
    w[18] *= 1000
    return w


def codes(packed):
    return unpack_nibbles(packed["qdata"]).long()


def test_round_trip_error_is_half_a_step_plus_bf16_rounding_of_scale_and_zero():
    w = awkward_weight()
    packed = SCHEME.quantize(w)
    err = (SCHEME.dequantize(packed) - w).abs().view(64, -1, GROUP)
    scale = packed["scale"].float()[..., None]
    zero = packed["zero"].float()[..., None]
    q = codes(packed).view(64, -1, GROUP)
    fp32_slack = 2.0**-20 * (w.abs().view(64, -1, GROUP).amax(-1, keepdim=True) + zero.abs())
    # Codes strictly inside 0..15 were rounded to the nearest grid point built from the stored
    # scale and zero: at most half a step away.
    inner = (q > 0) & (q < 15)
    assert (err <= scale / 2 + fp32_slack)[inner].all()
    # A clamped code can be further off only by how far bf16 rounding moved the grid's ends:
    # |zero' - zero| <= u|zero|, and 8|scale' - scale| <= 8u*scale.
    bound = torch.maximum(scale / 2, BF16_UNIT * 1.01 * (zero.abs() + 8 * scale)) + fp32_slack
    assert (err <= bound).all()
    # The awkward rows really exercise the bf16 term (otherwise the second check proves nothing).
    assert (err > scale / 2 + fp32_slack).any()


def test_scale_and_zero_follow_the_recipe_by_hand():
    w = awkward_weight(1)
    packed = SCHEME.quantize(w)
    groups = w.view(64, -1, GROUP)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    assert torch.equal(packed["scale"], scale.bfloat16())
    assert torch.equal(packed["zero"], (lo + 8 * scale).bfloat16())


def test_parameters_match_torchao_and_codes_are_never_worse():
    w = awkward_weight(2)
    packed = SCHEME.quantize(w)
    scales, zeros = get_groupwise_affine_qparams(w, n_bit=4, groupsize=GROUP, dtype=torch.bfloat16)
    assert torch.equal(packed["scale"], scales)
    assert torch.equal(packed["zero"], zeros)

    # torchao's codes (CPU returns them unpacked, 0..15). It rounds the grid's lowest value to
    # bf16 before dividing, so its codes can differ from ours; ours are the nearest grid point for
    # the dequantization w' = (q - 8) * scale + zero, so they must never be further from w.
    q_ao = groupwise_affine_quantize_tensor_from_qparams(w, scales, zeros, n_bit=4, groupsize=GROUP)
    s = scales.float().repeat_interleave(GROUP, -1)
    z = zeros.float().repeat_interleave(GROUP, -1)
    err_ours = ((codes(packed) - 8) * s + z - w).abs()
    err_ao = ((q_ao - 8) * s + z - w).abs()
    assert (err_ours <= err_ao + 2.0**-20 * (w.abs() + z.abs())).all()


def test_torchao_dequantizes_our_codes_to_our_values():
    w = awkward_weight(3)
    packed = SCHEME.quantize(w)
    ours = SCHEME.dequantize(packed)
    q = codes(packed).to(torch.int32)
    # torchao returns bfloat16 after two bf16 roundings ((q-8)*scale, then + zero).
    theirs = groupwise_affine_dequantize_tensor_from_qparams(
        q, packed["scale"], packed["zero"], n_bit=4, groupsize=GROUP
    ).float()
    step = (q - 8).abs() * packed["scale"].float().repeat_interleave(GROUP, -1)
    assert ((theirs - ours).abs() <= BF16_UNIT * (step + 2 * ours.abs()) + 1e-30).all()


def test_codes_use_the_full_range_and_constant_groups_stay_exact_enough():
    w = awkward_weight(4)
    packed = SCHEME.quantize(w)
    q = codes(packed)
    # Each group's min and max land on codes 0 and 15 (the range spans exactly 15 steps).
    zero_mean = q[:8].view(8, -1, GROUP)
    assert (zero_mean.amin(-1) == 0).all() and (zero_mean.amax(-1) == 15).all()
    back = SCHEME.dequantize(packed)
    assert (back[17].abs() <= 1e-5).all()  # all-zero row
    assert ((back[16, :GROUP] - 0.3).abs() <= BF16_UNIT * 0.3 + 1e-5).all()  # constant group


def test_bfloat16_weights_quantize_like_their_float32_values():
    w = awkward_weight(5).bfloat16()
    a, b = SCHEME.quantize(w), SCHEME.quantize(w.float())
    assert all(torch.equal(a[s], b[s]) for s in a)


_LAYOUT_CHECK = """
import sys, torch
from quant.int4_cpu_layout import cpu_int4_layout, packer_block_rows
from quant.nibbles import ROW_CHUNK, unpack_nibbles
gen = torch.Generator().manual_seed(11)
# Whole blocks, a partial last block of every size, a partial last chunk, and a strided view.
for rows in (16, 48, 64, 80, 96, 112, 320, 2 * ROW_CHUNK + 48):
    for width in (64, 256):
        qdata = torch.randint(0, 256, (rows, width // 2), dtype=torch.uint8, generator=gen)
        whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(qdata, torch.int32), 1)
        assert torch.equal(cpu_int4_layout(qdata), whole), (rows, width)
wide = torch.randint(0, 256, (128, 96), dtype=torch.uint8, generator=gen)
whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(wide[:, :32], torch.int32), 1)
assert torch.equal(cpu_int4_layout(wide[:, :32]), whole)
print(torch.backends.cpu.get_cpu_capability(), packer_block_rows())
"""


@pytest.mark.parametrize("capability", ["", "AVX2", "DEFAULT"])
def test_cpu_layout_is_the_packers_whatever_kernels_torch_picked(capability):
    """The CPU kernel's weight layout is built without PyTorch's packer where its blocks are known
    (AVX-512: rows in 64s, AVX2: 32s) and by the packer elsewhere: the packer called on the whole
    matrix is the reference in each case. ATEN_CPU_CAPABILITY makes torch pick another build's
    kernels (and layout) on this machine; the process is new because torch reads it at start."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()} if capability else dict(os.environ)
    done = subprocess.run([sys.executable, "-c", _LAYOUT_CHECK], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    picked, block = done.stdout.split()
    # The fast path is found wherever its layout is the packer's (and nowhere else).
    assert int(block) == {"AVX512": 64, "AVX2": 32}.get(picked, 0), done.stdout
