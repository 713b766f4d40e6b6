"""nf4: error bound from the code book, and bitsandbytes (quantize/dequantize/kernels) as reference."""

import pytest
import torch
from bitsandbytes import functional as bnb_functional

from quant import get_scheme
from quant.nf4 import NF4_CODE, cpu_fused_layout

SCHEME = get_scheme("nf4")
BLOCK = 64


def weight(seed=0, dtype=torch.float32, shape=(96, 320)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * (torch.rand(shape[0], 1, generator=g) * 4 + 1e-3)
    w[0, :BLOCK] = 0.0  # an all-zero block
    return w.to(dtype)


def test_code_book_is_bitsandbytes_nf4():
    assert torch.equal(torch.tensor(NF4_CODE), bnb_functional.get_4bit_type("nf4", device="cpu"))


def test_round_trip_error_is_half_the_gap_around_each_value():
    w = weight()
    packed = SCHEME.quantize(w)
    err = (SCHEME.dequantize(packed) - w).abs()
    absmax = packed["absmax"].repeat_interleave(BLOCK, -1)
    code = torch.tensor(NF4_CODE)
    # Each normalized value w/absmax lies between two neighbouring codes; the nearest one is at
    # most half that gap away.
    normalized = (w / absmax.clamp(min=1e-38)).clamp(-1, 1)
    upper = torch.searchsorted(code, normalized.contiguous()).clamp(1, 15)
    half_gap = (code[upper] - code[upper - 1]) / 2
    slack = 2.0**-22 * absmax
    assert (err <= half_gap * absmax + slack).all()
    # ... hence never more than half the widest gap (0.7230 -> 1.0) times absmax.
    assert (err <= (code.diff().max() / 2) * absmax + slack).all()
    assert (SCHEME.dequantize(packed)[0, :BLOCK] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_and_absmax_are_bitsandbytes_quantize_4bit(dtype):
    w = weight(1, dtype)
    packed = SCHEME.quantize(w)
    data, state = bnb_functional.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4")
    # bitsandbytes stores the flat [out*in/2] bytes and one absmax per 64 flat values; with
    # in_features % 64 == 0 that is exactly our [out, in/2] and [out, in/64].
    assert torch.equal(packed["qdata"].reshape(-1), data.reshape(-1))
    assert torch.equal(packed["absmax"].reshape(-1), state.absmax)


def test_bitsandbytes_dequantizes_our_packed_form_to_our_values():
    packed = SCHEME.quantize(weight(2))
    out, in2 = packed["qdata"].shape
    theirs = torch.ops.bitsandbytes.dequantize_4bit(
        packed["qdata"], packed["absmax"].reshape(-1), BLOCK, "nf4", [out, in2 * 2], torch.float32
    )
    assert torch.equal(theirs, SCHEME.dequantize(packed))


@pytest.mark.parametrize("shape", [(32, 64), (64, 256), (320, 128)])  # one tile; several; past a 256-row chunk
def test_fused_cpu_layout_is_the_one_bitsandbytes_builds(shape):
    w = weight(3, shape=shape)
    data, state = bnb_functional.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4")
    theirs, state = bnb_functional._convert_weight_packed_for_cpu(data, state)
    qdata = SCHEME.quantize(w)["qdata"]
    assert torch.equal(cpu_fused_layout(qdata), theirs)
    assert torch.equal(cpu_fused_layout(qdata.t().contiguous().t()), theirs)  # the same bytes, column-major


def test_bfloat16_cpu_matmul_uses_the_fused_kernel_with_bf16_absmax():
    if not bnb_functional.has_avx512bf16():
        pytest.skip("this CPU lacks AVX512-BF16, so bitsandbytes has no fused nf4 kernel to test")
    packed = SCHEME.quantize(weight(4))
    prepared = SCHEME.prepare(packed, "cpu", torch.bfloat16)
    assert "weight" in prepared.tensors  # the fused layout, not the dequantize fallback
    x = torch.randn(6, 320, generator=torch.Generator().manual_seed(5)).bfloat16()
    y = SCHEME.matmul(x, prepared).double()
    # The kernel reads absmax in bfloat16: compare with the weight it therefore stands for.
    w = SCHEME.dequantize({**packed, "absmax": packed["absmax"].bfloat16().float()}).double()
    ref = x.double() @ w.T
    mag = x.double().abs() @ w.abs().T
    # The kernel works in bf16: each dequantized weight may be rounded (at most u * sum|x||w|
    # overall) and so is the output (u * |ref|); float32 accumulation adds K * 2^-24 * sum|x||w|.
    u = 2.0**-8
    assert ((y - ref).abs() <= u * ref.abs() + (u + 320 * 2.0**-24) * mag).all()


def test_bitsandbytes_linear4bit_agrees_with_our_matmul():
    packed = SCHEME.quantize(weight(6))
    data, state = bnb_functional.quantize_4bit(weight(6), blocksize=BLOCK, quant_type="nf4")
    x = torch.randn(3, 320, generator=torch.Generator().manual_seed(7))
    import bitsandbytes

    theirs = bitsandbytes.matmul_4bit(x, data.t(), quant_state=state)
    ours = SCHEME.matmul(x, SCHEME.prepare(packed, "cpu", torch.float32))
    mag = x.abs() @ SCHEME.dequantize(packed).abs().T
    assert ((ours - theirs).abs() <= 2 * 320 * 2.0**-24 * mag).all()


def test_a_prefill_batch_reads_non_contiguous_packed_tensors_right():
    # From cpu_gemm_min_rows on, the product dequantizes the stored form itself (the caller's
    # views), which bitsandbytes reads as if contiguous. Reference: float64 on the stored weight.
    packed = SCHEME.quantize(torch.randn(64, 128, generator=torch.Generator().manual_seed(6)) * 0.02)
    spread = torch.zeros(64, 10)[:, 3:5]  # the same absmax values, 10 floats apart
    spread.copy_(packed["absmax"])
    prepared = SCHEME.prepare({**packed, "absmax": spread}, "cpu", torch.float32)
    x = torch.randn(SCHEME.cpu_gemm_min_rows, 128, generator=torch.Generator().manual_seed(7))
    exact = x.double() @ SCHEME.dequantize(packed).double().T
    assert (SCHEME.matmul(x, prepared).double() - exact).abs().max() <= 1e-5 * exact.abs().max()
