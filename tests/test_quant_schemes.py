"""Properties every quantization scheme must have, checked on random matrices.

References: safetensors files (bit-exact round trips), hand-computed byte counts, and plain
float64 matmuls of the dequantized weight with rounding bounds derived from the dtypes.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

from quant import get_scheme, scheme_from_metadata, scheme_names, slice_packed

SCHEMES = ("int4", "int8", "nf4")
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def random_weight(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # Rows of different magnitudes so per-row/per-group parameters actually differ.
    rows = torch.rand(*shape[:-1], 1, generator=g) * 2 + 0.01
    return (torch.randn(*shape, generator=g) * rows).to(dtype)


def matmul_bound(x, w, ref, dtype):
    """Largest |kernel - float64 reference| allowed, elementwise.

    ``x`` is already rounded to ``dtype``. Accumulating K products in float32 costs at most
    K * 2^-24 * sum|x||w|. A lower-precision compute dtype may also round each weight (and nf4's
    absmax) once, 2u * sum|x||w|, and rounds the output, u * |ref|.
    """
    k = x.shape[-1]
    mag = x.double().abs() @ w.double().abs().T
    bound = k * 2.0**-24 * mag
    if dtype != torch.float32:
        u = UNIT_ROUNDOFF[dtype]
        bound = bound + 2 * u * mag + u * ref.abs()
    return bound + 1e-30


def test_registry_lists_the_three_schemes_and_defaults_int4():
    assert scheme_names() == ("int4", "int8", "nf4")
    from quant import DEFAULT_SCHEME

    assert DEFAULT_SCHEME == "int4"
    assert get_scheme("int4").group_size == 128


def test_unknown_scheme_and_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'"):
        get_scheme("int3")
    with pytest.raises(ValueError, match="does not take options"):
        get_scheme("int8", group_size=128)
    with pytest.raises(ValueError, match="group size must be one of"):
        get_scheme("int4", group_size=100)
    with pytest.raises(ValueError, match="block size 64 only"):
        get_scheme("nf4", block_size=128)


@pytest.mark.parametrize(
    "metadata",
    [
        {"scheme": "int4", "group_size": 128},
        {"scheme": "int4", "group_size": 64},
        {"scheme": "int8"},
        {"scheme": "nf4", "block_size": 64},
    ],
)
def test_metadata_round_trips_through_the_registry(metadata):
    scheme = scheme_from_metadata(metadata)
    assert scheme.metadata() == metadata
    assert scheme_from_metadata(scheme.metadata()).metadata() == metadata


def test_metadata_without_scheme_is_refused():
    with pytest.raises(ValueError, match="no 'scheme' key"):
        scheme_from_metadata({"group_size": 128})


@pytest.mark.parametrize("name", SCHEMES)
def test_packed_form_survives_safetensors_bit_exactly(name, tmp_path):
    scheme = get_scheme(name)
    packed = scheme.quantize(random_weight(3, 64, 256, dtype=torch.bfloat16))
    path = tmp_path / "w.safetensors"
    save_file({f"experts.fc1.{suffix}": t for suffix, t in packed.items()}, str(path))
    loaded = load_file(str(path))
    assert set(loaded) == {f"experts.fc1.{suffix}" for suffix in packed}
    for suffix, tensor in packed.items():
        back = loaded[f"experts.fc1.{suffix}"]
        assert back.dtype == tensor.dtype and back.shape == tensor.shape
        # Compare raw bytes: equal() would treat -0.0 == 0.0 for float tensors.
        assert torch.equal(back.view(torch.uint8), tensor.view(torch.uint8))
    assert torch.equal(
        scheme.dequantize({s: loaded[f"experts.fc1.{s}"] for s in packed}), scheme.dequantize(packed)
    )


# Bytes per weight by hand: 4-bit codes plus bf16 scale+zero per 128 (int4); int8 codes plus a
# float32 scale per row; 4-bit codes plus a float32 absmax per 64 (nf4).
@pytest.mark.parametrize(
    ("name", "out_features", "in_features", "expected"),
    [
        ("int4", 3328, 2560, 3328 * 2560 // 2 + 3328 * (2560 // 128) * 2 * 2),
        ("int4", 2560, 1664, 2560 * 1664 // 2 + 2560 * (1664 // 128) * 2 * 2),
        ("int8", 3328, 2560, 3328 * 2560 + 3328 * 4),
        ("nf4", 3328, 2560, 3328 * 2560 // 2 + 3328 * (2560 // 64) * 4),
    ],
)
def test_packed_nbytes_matches_hand_count(name, out_features, in_features, expected):
    scheme = get_scheme(name)
    assert scheme.packed_nbytes((out_features, in_features)) == expected
    assert scheme.packed_nbytes((64, out_features, in_features)) == 64 * expected


def test_int4_bytes_per_param_is_0_53125_at_group_128():
    assert get_scheme("int4").packed_nbytes((2560, 2560)) / (2560 * 2560) == 0.53125


@pytest.mark.parametrize("name", SCHEMES)
def test_packed_spec_describes_quantize_output(name):
    scheme = get_scheme(name)
    packed = scheme.quantize(random_weight(2, 32, 256))
    spec = scheme.packed_spec((2, 32, 256))
    assert {s: (tuple(t.shape), t.dtype) for s, t in packed.items()} == spec
    assert scheme.packed_nbytes((2, 32, 256)) == sum(t.numel() * t.element_size() for t in packed.values())
    assert scheme.weight_shape(packed) == (2, 32, 256)


@pytest.mark.parametrize("name", SCHEMES)
def test_batched_quantize_equals_quantizing_each_expert(name):
    scheme = get_scheme(name)
    weight = random_weight(3, 64, 256, seed=1)
    grouped = scheme.quantize(weight)
    for e in range(3):
        one = scheme.quantize(weight[e])
        expert = slice_packed(grouped, e)
        assert all(torch.equal(expert[s], one[s]) for s in one)
    assert torch.equal(scheme.dequantize(grouped)[1], scheme.dequantize(slice_packed(grouped, 1)))


@pytest.mark.parametrize("name", SCHEMES)
def test_quantizing_a_few_rows_at_a_time_is_quantizing_the_whole_matrix(name, monkeypatch):
    """quantize works QUANTIZE_CHUNK_BYTES of rows at a time (here 5 rows, so chunks end off any
    group or tile boundary, and on a transposed view as HF experts come): the same bytes as
    one pass over the whole matrix, which the reference tests check."""
    import quant.base

    scheme = get_scheme(name)
    weight = random_weight(2, 256, 96, seed=7, dtype=torch.bfloat16).transpose(-1, -2)  # [E, 96, 256] view
    monkeypatch.setattr(quant.base, "QUANTIZE_CHUNK_BYTES", 1 << 40)
    whole = scheme.quantize(weight)
    monkeypatch.setattr(quant.base, "QUANTIZE_CHUNK_BYTES", 5 * 4 * 256)
    chunked = scheme.quantize(weight)
    assert all(torch.equal(chunked[s], whole[s]) for s in whole)
    weight = weight.clone()
    weight[1, 93, 7] = float("inf")  # in the last chunk of the second expert
    with pytest.raises(ValueError, match=r"NaN or infinite values \(slice 1\)"):
        scheme.quantize(weight)


@pytest.mark.parametrize("name", SCHEMES)
def test_transposed_views_quantize_like_contiguous_weights(name):
    scheme = get_scheme(name)
    stored_in_out = random_weight(2, 256, 64, seed=6, dtype=torch.bfloat16)  # HF grouped [E, in, out]
    view = stored_in_out.transpose(-1, -2)
    a, b = scheme.quantize(view), scheme.quantize(view.contiguous())
    assert all(torch.equal(a[s], b[s]) for s in a)


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_cpu_matmul_equals_dequantize_then_matmul(name, dtype, path):
    # Both CPU paths: a decode-sized batch (the quantized kernel) and a prefill-sized one
    # (dequantize once, then the compute dtype's GEMM).
    scheme = get_scheme(name)
    rows = 5 if path == "gemv" else scheme.cpu_gemm_min_rows + 3
    assert (rows >= scheme.cpu_gemm_min_rows) == (path == "gemm")
    packed = scheme.quantize(random_weight(96, 512, seed=2))
    weight = scheme.dequantize(packed)
    prepared = scheme.prepare(packed, "cpu", dtype)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(3))
    y = scheme.matmul(x, prepared)
    assert y.dtype == torch.float32 and y.shape == (rows, 96)
    x_rounded = x.to(dtype)
    ref = x_rounded.double() @ weight.double().T
    assert ((y.double() - ref).abs() <= matmul_bound(x_rounded, weight, ref, dtype)).all()


@pytest.mark.parametrize("name", SCHEMES)
def test_matmul_keeps_leading_dims_and_input_dtype(name):
    scheme = get_scheme(name)
    packed = scheme.quantize(random_weight(64, 256, seed=4))
    prepared = scheme.prepare(packed, "cpu")
    x = torch.randn(2, 3, 256).bfloat16()
    y = scheme.matmul(x, prepared)
    assert y.shape == (2, 3, 64) and y.dtype == torch.bfloat16
    assert torch.equal(y[1, 2], scheme.matmul(x[1, 2:3], prepared)[0])
    assert scheme.matmul(torch.randn(0, 256), prepared).shape == (0, 64)


@pytest.mark.parametrize("name", SCHEMES)
def test_one_expert_slice_prepares_and_multiplies_like_its_own_weight(name):
    scheme = get_scheme(name)
    weight = random_weight(4, 64, 256, seed=5)
    grouped = scheme.quantize(weight)
    x = torch.randn(3, 256)
    from_slice = scheme.matmul(x, scheme.prepare(slice_packed(grouped, 2), "cpu", torch.float32))
    from_own = scheme.matmul(x, scheme.prepare(scheme.quantize(weight[2]), "cpu", torch.float32))
    assert torch.equal(from_slice, from_own)


@pytest.mark.parametrize("name", SCHEMES)
def test_prepare_refuses_a_batch_and_matmul_checks_inputs(name):
    scheme = get_scheme(name)
    grouped = scheme.quantize(random_weight(2, 64, 256))
    with pytest.raises(ValueError, match="slice_packed"):
        scheme.prepare(grouped, "cpu")
    prepared = scheme.prepare(slice_packed(grouped, 0), "cpu")
    with pytest.raises(ValueError, match="input has 128 features but the weight expects 256"):
        scheme.matmul(torch.randn(1, 128), prepared)
    other = next(get_scheme(n) for n in SCHEMES if n != name)
    with pytest.raises(ValueError, match=f"prepared for {name}"):
        other.matmul(torch.randn(1, 256), prepared)
    with pytest.raises(ValueError, match="compute dtype"):
        scheme.prepare(slice_packed(grouped, 0), "cpu", torch.float64)


@pytest.mark.parametrize("name", SCHEMES)
def test_mismatched_packed_tensors_are_named(name):
    scheme = get_scheme(name)
    packed = scheme.quantize(random_weight(64, 256))
    with pytest.raises(ValueError, match="needs tensors"):
        scheme.dequantize({k: v for k, v in packed.items() if k != "qdata"})
    second = scheme.suffixes[1]
    with pytest.raises(ValueError, match=f"'{second}' should be"):
        scheme.dequantize({**packed, second: packed[second][:-1]})
    with pytest.raises(ValueError, match=f"'{second}' should be"):
        scheme.prepare({**packed, second: packed[second].double()}, "cpu")


@pytest.mark.parametrize("name", SCHEMES)
def test_quantize_refuses_non_finite_and_integer_weights(name):
    scheme = get_scheme(name)
    weight = random_weight(64, 256)
    weight[3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        scheme.quantize(weight)
    with pytest.raises(ValueError, match="float weights"):
        scheme.quantize(torch.ones(64, 256, dtype=torch.int32))


@pytest.mark.parametrize(
    ("name", "shape", "problem"),
    [
        ("int4", (64, 200), "in_features divisible by the group size 128, got 200"),
        ("int4", (24, 256), "out_features divisible by 16, got 24"),
        ("nf4", (64, 96), "in_features divisible by its block size 64, got 96"),
        ("nf4", (48, 128), "out_features divisible by 32, got 48"),
        ("int8", (7,), "matrices"),
    ],
)
def test_shapes_the_kernels_cannot_take_are_refused_with_the_reason(name, shape, problem):
    scheme = get_scheme(name)
    assert problem in scheme.why_unsupported(shape)
    with pytest.raises(ValueError, match=problem):
        scheme.quantize(torch.randn(shape))
    with pytest.raises(ValueError, match=problem):
        scheme.packed_nbytes(shape)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("int4", (16, 128)),
        ("int4", (3328, 2560)),
        ("int8", (7, 33)),
        ("nf4", (32, 64)),
        ("nf4", (2560, 1664)),
    ],
)
def test_fitting_shapes_have_no_problem(name, shape):
    assert get_scheme(name).why_unsupported(shape) is None


def test_int8_takes_any_matrix_shape():
    scheme = get_scheme("int8")
    packed = scheme.quantize(random_weight(7, 33))
    x = torch.randn(2, 33)
    y = scheme.matmul(x, scheme.prepare(packed, "cpu", torch.float32))
    ref = x.double() @ scheme.dequantize(packed).double().T
    assert ((y.double() - ref).abs() <= matmul_bound(x, scheme.dequantize(packed), ref, torch.float32)).all()


def test_int4_group_size_option_changes_groups_and_still_multiplies():
    scheme = get_scheme("int4", group_size=32)
    packed = scheme.quantize(random_weight(32, 96))
    assert packed["scale"].shape == (32, 3)
    weight = scheme.dequantize(packed)
    x = torch.randn(2, 96)
    y = scheme.matmul(x, scheme.prepare(packed, "cpu", torch.float32))
    ref = x.double() @ weight.double().T
    assert ((y.double() - ref).abs() <= matmul_bound(x, weight, ref, torch.float32)).all()


@pytest.mark.parametrize("name", SCHEMES)
def test_quantize_takes_a_parameter_and_returns_plain_tensors(name):
    scheme = get_scheme(name)
    parameter = torch.nn.Parameter(random_weight(64, 256))
    packed = scheme.quantize(parameter)
    assert not any(t.requires_grad for t in packed.values())
    assert all(type(t) is torch.Tensor for t in packed.values())
    assert torch.equal(scheme.dequantize(packed), scheme.dequantize(scheme.quantize(parameter.detach())))


@pytest.mark.parametrize("rows", [1, 17])
def test_int8_cuda_product_is_the_dequantized_gemm(rows):
    # No GPU here: the CUDA kernel prepare picks runs on CPU tensors just the same.
    scheme = get_scheme("int8")
    packed = scheme.quantize(random_weight(64, 256, seed=7))
    weight = scheme.dequantize(packed)
    _, kernel = scheme._prepare_cuda(packed, torch.float32)
    x = torch.randn(rows, 256)
    y = kernel(x, {"qdata": packed["qdata"], "scale": packed["scale"]})
    ref = x.double() @ weight.double().T
    assert ((y.double() - ref).abs() <= matmul_bound(x, weight, ref, torch.float32)).all()


def test_nf4_cuda_batched_path_dequantizes_the_plain_layout():
    from quant.nf4 import _bitsandbytes, _mm_cuda

    _bitsandbytes()  # prepare() would have loaded the kernels

    scheme = get_scheme("nf4")
    packed = scheme.quantize(random_weight(64, 256, seed=8))
    weight = scheme.dequantize(packed)
    x = torch.randn(4, 256)
    y = _mm_cuda(x, {"qdata": packed["qdata"], "absmax": packed["absmax"]})
    ref = x.double() @ weight.double().T
    assert ((y.double() - ref).abs() <= matmul_bound(x, weight, ref, torch.float32)).all()


@pytest.mark.parametrize("name", SCHEMES)
def test_cpu_prepare_keeps_the_stored_form_as_views_outside_the_kernel_layout(name):
    # The large-batch path reads the stored form; holding it must cost no copy (and it stays out
    # of `tensors`, which the offload store copies per expert).
    scheme = get_scheme(name)
    grouped = scheme.quantize(random_weight(2, 64, 256, seed=9))
    one = slice_packed(grouped, 1)
    prepared = scheme.prepare(one, "cpu", torch.bfloat16)
    assert prepared.plain.keys() == one.keys()
    assert all(prepared.plain[k].data_ptr() == one[k].data_ptr() for k in one)
