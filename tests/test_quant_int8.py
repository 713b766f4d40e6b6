"""int8 per-channel symmetric: error bound from the scheme, and torchao's Int8WeightOnlyConfig as reference."""

import torch
from torchao.quantization import Int8WeightOnlyConfig, quantize_

from quant import get_scheme

SCHEME = get_scheme("int8")


def weight(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(96, 320, generator=g) * (torch.rand(96, 1, generator=g) * 10 + 1e-3)
    w[5] = 0.0  # a zero row keeps a tiny positive scale and decodes to zeros
    w[6, 3] = -50.0  # a negative absmax is -127.5 steps: rounds (half to even) to -128
    return w.to(dtype)


def half_step_bound(packed):
    # Half a step, plus float32 rounding: the stored scale is within 2^-24 (relative) of
    # absmax / 127.5 and the product q * scale adds another 2^-24, on values up to 128 steps.
    scale = packed["scale"][:, None]
    return scale / 2 + 3 * 128 * 2.0**-24 * scale


def test_round_trip_error_is_at_most_half_a_step():
    w = weight()
    packed = SCHEME.quantize(w)
    err = (SCHEME.dequantize(packed) - w).abs()
    # w / scale lies in [-127.5, 127.5]; rounding moves it at most 1/2, and the one clamp
    # (127.5 -> 128 -> 127) also leaves it 1/2 away.
    assert (err <= half_step_bound(packed)).all()
    assert packed["qdata"][6, 3] == -128
    assert (SCHEME.dequantize(packed)[5] == 0).all()


def test_scale_is_absmax_over_127_5_by_hand():
    w = weight(1)
    packed = SCHEME.quantize(w)
    expected = (w.abs().amax(-1) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
    assert torch.equal(packed["scale"], expected)
    assert packed["scale"][5] == torch.finfo(torch.float32).eps


def torchao_int8(w):
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
    quantize_(linear, Int8WeightOnlyConfig(set_inductor_config=False))
    return linear


def test_float32_weights_give_torchaos_exact_codes_and_scales():
    w = weight(2)
    packed = SCHEME.quantize(w)
    reference = torchao_int8(w).weight
    assert torch.equal(packed["qdata"], reference.qdata)
    assert torch.equal(packed["scale"], reference.scale.view(-1))


def test_bfloat16_weights_keep_a_float32_scale_that_torchao_rounds():
    w = weight(3, torch.bfloat16)
    packed = SCHEME.quantize(w)
    reference = torchao_int8(w).weight
    # torchao divides in bfloat16; ours is the same quotient before that rounding.
    assert torch.equal(packed["scale"].bfloat16().float(), reference.scale.view(-1))
    err = (SCHEME.dequantize(packed) - w.float()).abs()
    assert (err <= half_step_bound(packed)).all()


def test_linear_output_agrees_with_torchao_int8_linear():
    w = weight(4)
    x = torch.randn(3, 320, generator=torch.Generator().manual_seed(5))
    ours = SCHEME.matmul(x, SCHEME.prepare(SCHEME.quantize(w), "cpu", torch.float32))
    theirs = torchao_int8(w)(x)
    mag = x.abs() @ SCHEME.dequantize(SCHEME.quantize(w)).abs().T
    assert ((ours - theirs).abs() <= 2 * 320 * 2.0**-24 * mag).all()


def test_cpu_kernel_runs_on_codes_at_any_offset_of_a_file_mapping():
    # Views into a safetensors file start wherever the file puts them; the CPU kernel crashes
    # (SIGSEGV, bfloat16) on codes 8 bytes off a 16-byte boundary unless prepare gives them their own memory.
    # (Shape-dependent: this one crashed, a 64-row weight did not.)
    packed = SCHEME.quantize(torch.randn(256, 128, generator=torch.Generator().manual_seed(4)))
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(5)).bfloat16()
    expected = SCHEME.matmul(x, SCHEME.prepare(packed, "cpu", torch.bfloat16))
    for offset in (1, 8, 24):
        memory = torch.empty(packed["qdata"].numel() + 64, dtype=torch.int8)
        codes = memory[offset : offset + packed["qdata"].numel()].view_as(packed["qdata"])
        codes.copy_(packed["qdata"])
        assert codes.data_ptr() % 16  # the condition that used to crash
        prepared = SCHEME.prepare({**packed, "qdata": codes}, "cpu", torch.bfloat16)
        assert torch.equal(SCHEME.matmul(x, prepared), expected)


def test_bfloat16_cpu_product_is_right_at_widths_the_kernel_cannot_take():
    # `_weight_int8pack_mm` in bfloat16 returns garbage (or crashes) unless in_features % 16 == 0;
    # such widths take the dequantize-and-GEMM form. Reference: the same product in float64.
    for in_features in (20, 24, 36, 40, 48):
        packed = SCHEME.quantize(torch.randn(40, in_features, generator=torch.Generator().manual_seed(in_features)))
        x = torch.randn(1, in_features, generator=torch.Generator().manual_seed(1)).bfloat16()
        got = SCHEME.matmul(x, SCHEME.prepare(packed, "cpu", torch.bfloat16)).double()
        exact = x.double() @ SCHEME.dequantize(packed).double().T
        assert (got - exact).abs().max() <= 2e-2 * exact.abs().max(), in_features


def test_bfloat16_cpu_kernel_takes_a_row_sliced_out_of_a_wider_tensor():
    # One row of a wider tensor counts as contiguous but can start 16 bytes off the 32-byte
    # boundary the kernel needs (it crashed the process). Reference: float64 on the stored weight.
    packed = SCHEME.quantize(torch.randn(16, 64, generator=torch.Generator().manual_seed(2)))
    prepared = SCHEME.prepare(packed, "cpu", torch.bfloat16)
    wide = torch.randn(1, 128, generator=torch.Generator().manual_seed(3)).bfloat16()
    for start in (8, 16, 24):
        x = wide[:, start : start + 64]
        assert x.is_contiguous()
        exact = x.double() @ SCHEME.dequantize(packed).double().T
        assert (SCHEME.matmul(x, prepared).double() - exact).abs().max() <= 2e-2 * exact.abs().max()


def test_float16_product_of_many_rows_does_not_overflow_where_the_answer_fits():
    # Summing raw codes (up to 128 x each input) passes float16's 65504 long before the scaled
    # product does; a prefill-sized batch takes that path (the one CUDA takes for every batch).
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4)) * 0.02
    w[:, 0] = 0.1  # every row's largest weight meets the outlier input
    packed = SCHEME.quantize(w)
    x = torch.zeros(32, 64)
    x[:, 0] = 600.0
    exact = x.double() @ SCHEME.dequantize(packed).double().T  # about 60
    got = SCHEME.matmul(x.half(), SCHEME.prepare(packed, "cpu", torch.float16)).double()
    assert got.isfinite().all() and (got - exact).abs().max() <= 1e-2 * exact.abs().max()
