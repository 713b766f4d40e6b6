"""int8: per-output-channel symmetric weight-only (torchao's Int8WeightOnlyConfig recipe).

Per output row: scale = max(absmax / 127.5, float32 eps) stored as float32,
q = clamp(round(w / scale), -128, 127), w' = q * scale. Every weight is within scale/2 of w'
(absmax maps to 127.5, which rounds to 128 and clamps to 127: still half a step).
Stored bytes: 1 per weight plus 4 per output row.

The scale is computed in float32 even for bfloat16 weights (torchao computes absmax / 127.5 in
the weight dtype, i.e. rounds the scale to bfloat16 first); for float32 weights the codes and
scales are torchao's exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import KERNEL_ALIGNMENT, Kernel, PackedSpec, Scheme

MIN_SCALE = torch.finfo(torch.float32).eps
BF16_KERNEL_FEATURES = 16  # `_weight_int8pack_mm` in bfloat16 needs in_features to be a multiple


class Int8Scheme(Scheme):
    name = "int8"
    suffixes = ("qdata", "scale")
    cpu_gemm_min_rows = 16  # crossover between 8 and 16 rows on 2 cores for Aria's expert shapes
    same_layout_on_every_device = True  # codes as stored, scales in the compute dtype
    cuda_dequantizes = True  # always (see _prepare_cuda)

    def metadata(self) -> dict[str, int | str]:
        return {"scheme": self.name}

    def _shape_problem(self, out_features: int, in_features: int) -> str | None:
        return None

    def _packed_spec_2d(self, out_features: int, in_features: int) -> PackedSpec:
        return {
            "qdata": ((out_features, in_features), torch.int8),
            "scale": ((out_features,), torch.float32),
        }

    def _weight_shape_2d(self, packed: dict[str, Tensor]) -> tuple[int, int]:
        return tuple(packed["qdata"].shape[-2:])

    def _quantize_2d(self, weight: Tensor) -> dict[str, Tensor]:
        scale = (weight.abs().amax(dim=-1) / 127.5).clamp(min=MIN_SCALE)
        # Multiply by the reciprocal as torchao does, so float32 weights give its exact codes.
        q = (weight * (1.0 / scale)[:, None]).round_().clamp_(-128, 127).to(torch.int8)
        return {"qdata": q, "scale": scale}

    def _dequantize_2d(self, packed: dict[str, Tensor]) -> Tensor:
        return packed["qdata"].float() * packed["scale"][:, None]

    def _prepare_cpu(self, packed: dict[str, Tensor], dtype: torch.dtype) -> tuple[dict[str, Tensor], Kernel]:
        # The kernel wants the scales in the activation dtype, and its codes 16-byte aligned (it
        # crashes on codes at 8 bytes past a boundary), which a view into a safetensors file
        # need not be: such codes get their own allocation (64-byte aligned).
        qdata = packed["qdata"].contiguous()
        if qdata.data_ptr() % KERNEL_ALIGNMENT:
            qdata = qdata.clone()
        tensors = {"qdata": qdata, "scale": packed["scale"].to(dtype)}
        # In bfloat16 the kernel reads whole 16-feature vectors: other widths give garbage (or
        # crash). Aria's widths are multiples of 64; anything else takes the exact GEMM form.
        if dtype == torch.bfloat16 and qdata.shape[-1] % BF16_KERNEL_FEATURES:
            return tensors, _dequantized_gemm
        return tensors, _mm_cpu

    def _prepare_cuda(
        self, packed: dict[str, Tensor], dtype: torch.dtype
    ) -> tuple[dict[str, Tensor], Kernel]:
        # Not aten._weight_int8pack_mm: on CUDA it is a reference kernel (one thread per output,
        # each reading its own weight row, so a warp's loads are K bytes apart, in float32).
        # The dequantize-and-GEMM form is gpt-fast's and torchao's int8 recipe: compiled decode
        # fuses it into one kernel that reads the int8 codes (with inductor's coordinate descent
        # tuning on, as compiled decode on a GPU sets it); eager runs it on cuBLAS.
        tensors = {"qdata": packed["qdata"].contiguous(), "scale": packed["scale"].to(dtype)}
        return tensors, _dequantized_gemm

    def _cpu_gemm(self, x: Tensor, packed: dict[str, Tensor]) -> Tensor:
        return _dequantized_gemm(x, packed)

    def plain_from_cpu_tensors(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return tensors  # the CPU kernel reads the stored codes; only the scale is in the compute dtype


def _mm_cpu(x: Tensor, tensors: dict[str, Tensor]) -> Tensor:
    # The kernel also crashes (bfloat16) on activations off a 32-byte boundary, e.g. one row
    # sliced out of a wider tensor, which still counts as contiguous. (A compiled graph has no
    # addresses to check; its buffers are fresh allocations.)
    if not torch.compiler.is_compiling() and x.data_ptr() % KERNEL_ALIGNMENT:
        x = x.clone()
    return torch.ops.aten._weight_int8pack_mm(x, tensors["qdata"], tensors["scale"])


def _dequantized_gemm(x: Tensor, tensors: dict[str, Tensor]) -> Tensor:
    # The codes convert exactly (|q| <= 128 fits any float mantissa); the per-row scale applies
    # to the output, so the weight is never scaled. Except in float16, whose range (65504) a
    # sum over raw codes, up to 128 times each input, overflows where the scaled product fits.
    qdata, scale = tensors["qdata"].to(x.dtype), tensors["scale"].to(x.dtype)
    if x.dtype == torch.float16:
        return F.linear(x, qdata * scale[:, None])
    return F.linear(x, qdata) * scale
