"""nf4: 4-bit NormalFloat in blocks of 64 (bitsandbytes' quantize_4bit, quant_type="nf4").

Per block of 64 consecutive input features of one output row: absmax (float32) and, per weight,
the index of the NF4 code nearest to w / absmax (ties go to the lower code). w' = code * absmax.
Blocks never span rows (in_features % 64 == 0), so the stored bytes are exactly bitsandbytes'
flat layout reshaped to [out, in/2], and one expert is a plain slice. Stored bytes: 0.5 per
weight plus a float32 absmax per block, 0.5625 B/param. Kernels come from bitsandbytes.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Kernel, PackedSpec, Scheme
from .nibbles import pack_nibbles, pair_rows, unpack_nibbles

BLOCK_SIZE = 64
# bitsandbytes' fused CPU kernel interleaves 32 output rows at a time.
OUT_MULTIPLE = 32

# The 16 NormalFloat4 levels (QLoRA, Dettmers et al. 2023), as float32, ascending.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def nf4_code(device: torch.device | str = "cpu") -> Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


class Nf4Scheme(Scheme):
    name = "nf4"
    suffixes = ("qdata", "absmax")
    # Dequantizing is cheap here (bitsandbytes' C++ dequantize, ~1 ms for an expert): crossover
    # between 16 and 32 rows on 2 cores for Aria's expert shapes.
    cpu_gemm_min_rows = 24
    cuda_dequantizes = True  # for more than one row (see _mm_cuda)
    block_size = BLOCK_SIZE

    def __init__(self, block_size: int = BLOCK_SIZE):
        # Accepted so metadata round-trips; the kernels and layout here are built for 64 only.
        if block_size != BLOCK_SIZE:
            raise ValueError(f"nf4 supports block size {BLOCK_SIZE} only, got {block_size}")

    def metadata(self) -> dict[str, int | str]:
        return {"scheme": self.name, "block_size": self.block_size}

    def _shape_problem(self, out_features: int, in_features: int) -> str | None:
        if in_features % BLOCK_SIZE:
            return f"nf4 needs in_features divisible by its block size {BLOCK_SIZE}, got {in_features}"
        if out_features % OUT_MULTIPLE:
            return f"nf4 kernels need out_features divisible by {OUT_MULTIPLE}, got {out_features}"
        return None

    def _packed_spec_2d(self, out_features: int, in_features: int) -> PackedSpec:
        return {
            "qdata": ((out_features, in_features // 2), torch.uint8),
            "absmax": ((out_features, in_features // BLOCK_SIZE), torch.float32),
        }

    def _weight_shape_2d(self, packed: dict[str, Tensor]) -> tuple[int, int]:
        return packed["qdata"].shape[-2], packed["qdata"].shape[-1] * 2

    def _quantize_2d(self, weight: Tensor) -> dict[str, Tensor]:
        out_features, in_features = weight.shape
        blocks = weight.view(out_features, -1, BLOCK_SIZE)
        absmax = blocks.abs().amax(dim=-1)
        # Multiply by the reciprocal like bitsandbytes does, so the codes match its bytes exactly;
        # an all-zero block keeps absmax 0 and dequantizes to zeros.
        normalized = (blocks * (1.0 / absmax.clamp(min=1e-38))[..., None]).clamp_(-1, 1)
        code = nf4_code(weight.device)
        midpoints = (code[:-1] + code[1:]) / 2
        q = torch.bucketize(normalized.contiguous(), midpoints.contiguous())
        return {"qdata": pack_nibbles(q.view(out_features, in_features)), "absmax": absmax}

    def _dequantize_2d(self, packed: dict[str, Tensor]) -> Tensor:
        code = nf4_code(packed["qdata"].device)
        values = code[unpack_nibbles(packed["qdata"]).long()]
        out_features, in_features = values.shape
        blocks = values.view(out_features, -1, BLOCK_SIZE) * packed["absmax"][..., None]
        return blocks.view(out_features, in_features)

    def _prepare_cpu(self, packed: dict[str, Tensor], dtype: torch.dtype) -> tuple[dict[str, Tensor], Kernel]:
        bnb = _bitsandbytes()
        if dtype == torch.bfloat16 and _has_fused_cpu_kernel(bnb):
            # The fused kernel works in bfloat16 throughout: it reads absmax as bfloat16
            # [in/64, out] and rounds weights and outputs to bfloat16 (bounds in the tests).
            tensors = {
                "weight": cpu_fused_layout(packed["qdata"]),
                "absmax": packed["absmax"].t().to(torch.bfloat16).contiguous(),
                "code": nf4_code(),
            }
            return tensors, _gemv_4bit
        return _dequantize_then_linear_tensors(packed), _dequantize_then_linear

    def _cpu_gemm(self, x: Tensor, packed: dict[str, Tensor]) -> Tensor:
        return _dequantize_then_linear(x, packed)  # _prepare_cpu loaded the bitsandbytes ops

    def _prepare_cuda(
        self, packed: dict[str, Tensor], dtype: torch.dtype
    ) -> tuple[dict[str, Tensor], Kernel]:
        _bitsandbytes()
        tensors = _dequantize_then_linear_tensors(packed)
        tensors["code"] = nf4_code(packed["qdata"].device)
        return tensors, _mm_cuda


def cpu_fused_layout(qdata: Tensor) -> Tensor:
    """Reorder [out, in/2] nf4 bytes into the layout bitsandbytes' fused AVX512-BF16 kernel reads.

    Per tile of 32 output rows and per pair of input features (2j, 2j+1) the kernel loads 32
    bytes holding the tile's 64 codes in (row, feature) order: rows 0-15 in the low nibbles,
    rows 16-31 in the high nibbles.
    """
    qdata = qdata.contiguous()
    out = torch.empty_like(qdata)
    pair_rows(qdata, OUT_MULTIPLE, out, feature_last=True)
    return out


def _dequantize_then_linear_tensors(packed: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"qdata": packed["qdata"].contiguous(), "absmax": packed["absmax"].contiguous()}


def _dequantize_then_linear(x: Tensor, tensors: dict[str, Tensor]) -> Tensor:
    # bitsandbytes reads raw memory as if contiguous; the CPU GEMM path gets the caller's views.
    qdata, absmax = tensors["qdata"].contiguous(), tensors["absmax"].contiguous()
    shape = [qdata.shape[0], qdata.shape[1] * 2]
    weight = torch.ops.bitsandbytes.dequantize_4bit(qdata, absmax, BLOCK_SIZE, "nf4", shape, x.dtype)
    return F.linear(x, weight)


def _gemv_4bit(x: Tensor, tensors: dict[str, Tensor]) -> Tensor:
    weight = tensors["weight"]
    shape = [weight.shape[0], weight.shape[1] * 2]
    return torch.ops.bitsandbytes.gemv_4bit(x, weight, shape, tensors["absmax"], tensors["code"], BLOCK_SIZE)


def _mm_cuda(x: Tensor, tensors: dict[str, Tensor]) -> Tensor:
    # bitsandbytes' CUDA gemv reads the plain layout; larger batches dequantize and use cuBLAS.
    if x.shape[0] == 1:
        return _gemv_4bit(x, {**tensors, "weight": tensors["qdata"]})
    return _dequantize_then_linear(x, tensors)


def _has_fused_cpu_kernel(bnb) -> bool:
    # bitsandbytes registers its fused CPU gemv only when the CPU has AVX512-BF16, and only
    # releases that ship the packing helper read the layout cpu_fused_layout builds.
    has_avx512bf16 = getattr(bnb.functional, "has_avx512bf16", None)
    knows_layout = hasattr(bnb.functional, "_convert_weight_packed_for_cpu")
    return bool(knows_layout and has_avx512bf16 and has_avx512bf16())


def _bitsandbytes():
    """Import bitsandbytes (registers torch.ops.bitsandbytes) without its import-time log noise."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)  # it warns about an optional hub kernel it could not fetch
    try:
        import bitsandbytes
        import bitsandbytes.functional  # has_avx512bf16 lives here
    finally:
        logger.setLevel(level)
    return bitsandbytes
