"""int4: group-wise asymmetric 4-bit weights in the tinygemm recipe (torchao's int4 weight-only).

Per group of ``group_size`` consecutive input features of one output row:
    scale = max((max - min) / 15, 1e-6),  zero = min + 8 * scale      (both stored as bfloat16)
    q     = clamp(round((w - (zero - 8 * scale)) / scale), 0, 15)
    w'    = (q - 8) * scale + zero
The zero point lives in the float domain and need not be representable, which is what the
tinygemm kernels (`aten._weight_int4pack_mm*`) expect. Stored bytes: 0.5 per weight plus one
bfloat16 scale and zero per group, 0.53125 B/param at group 128.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Kernel, PackedSpec, Scheme
from .int4_cpu_layout import cpu_int4_layout
from .nibbles import ROW_CHUNK, pack_nibbles, unpack_nibbles

# Group sizes the tinygemm CPU and CUDA kernels are compiled for.
GROUP_SIZES = (32, 64, 128, 256)
# The CPU packer handles 16 output rows at a time (the CUDA one 8).
OUT_MULTIPLE = 16
MIN_SCALE = 1e-6  # torchao's eps for this recipe; keeps constant groups finite


class Int4Scheme(Scheme):
    name = "int4"
    suffixes = ("qdata", "scale", "zero")
    cpu_gemm_min_rows = 96  # crossover near 96 rows on 2 cores for Aria's expert shapes

    def __init__(self, group_size: int = 128):
        if group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
        self.group_size = group_size

    def metadata(self) -> dict[str, int | str]:
        return {"scheme": self.name, "group_size": self.group_size}

    def _shape_problem(self, out_features: int, in_features: int) -> str | None:
        if in_features % self.group_size:
            return f"int4 needs in_features divisible by the group size {self.group_size}, got {in_features}"
        if out_features % OUT_MULTIPLE:
            return f"int4 kernels need out_features divisible by {OUT_MULTIPLE}, got {out_features}"
        return None

    def _packed_spec_2d(self, out_features: int, in_features: int) -> PackedSpec:
        groups = in_features // self.group_size
        return {
            "qdata": ((out_features, in_features // 2), torch.uint8),
            "scale": ((out_features, groups), torch.bfloat16),
            "zero": ((out_features, groups), torch.bfloat16),
        }

    def _weight_shape_2d(self, packed: dict[str, Tensor]) -> tuple[int, int]:
        return packed["qdata"].shape[-2], packed["qdata"].shape[-1] * 2

    def _quantize_2d(self, weight: Tensor) -> dict[str, Tensor]:
        out_features, in_features = weight.shape
        groups = weight.view(out_features, -1, self.group_size)
        lo = groups.amin(dim=-1)
        hi = groups.amax(dim=-1)
        exact_scale = ((hi - lo) / 15).clamp(min=MIN_SCALE)
        scale = exact_scale.to(torch.bfloat16)
        zero = (lo + 8 * exact_scale).to(torch.bfloat16)
        # Round against the parameters as stored, so the error bound holds for what is dequantized.
        lowest = zero.float() - 8 * scale.float()
        q = ((groups - lowest[..., None]) / scale.float()[..., None]).round_().clamp_(0, 15)
        return {"qdata": pack_nibbles(q.view(out_features, in_features)), "scale": scale, "zero": zero}

    def _dequantize_2d(self, packed: dict[str, Tensor]) -> Tensor:
        return _dequantize_rows(packed, self.group_size, torch.float32)

    def _scales_and_zeros(self, packed: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        # tinygemm wants [n_groups, out, 2] with (scale, zero) innermost.
        return torch.stack((packed["scale"], packed["zero"]), dim=-1).transpose(0, 1).contiguous().to(dtype)

    def _prepare_cpu(self, packed: dict[str, Tensor], dtype: torch.dtype) -> tuple[dict[str, Tensor], Kernel]:
        tensors = {"weight": cpu_int4_layout(packed["qdata"]), "scales_and_zeros": self._scales_and_zeros(packed, dtype)}
        return tensors, partial(_mm, torch.ops.aten._weight_int4pack_mm_for_cpu, self.group_size)

    def _cpu_gemm(self, x: Tensor, packed: dict[str, Tensor]) -> Tensor:
        return F.linear(x, _dequantize_rows(packed, self.group_size, x.dtype))

    def device_problem(self, device: torch.device | str, dtype: torch.dtype) -> str | None:
        device = torch.device(device)
        if device.type != "cuda":
            return None
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 0):
            return (f"int4's CUDA kernel needs an Ampere or newer GPU (compute capability 8.0+); "
                    f"{device} is {capability[0]}.{capability[1]}")
        if dtype != torch.bfloat16:
            return f"int4's CUDA kernel computes in bfloat16, not {str(dtype).removeprefix('torch.')}"
        return None

    def _prepare_cuda(
        self, packed: dict[str, Tensor], dtype: torch.dtype
    ) -> tuple[dict[str, Tensor], Kernel]:
        problem = self.device_problem(packed["qdata"].device, dtype)
        if problem:
            raise ValueError(problem)
        in_features = packed["qdata"].shape[-1] * 2
        # Largest tile count the kernel accepts for this width (in_features % (16 * tiles) == 0).
        inner_k_tiles = next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)
        weight = torch.ops.aten._convert_weight_to_int4pack(packed["qdata"].contiguous(), inner_k_tiles)
        tensors = {"weight": weight, "scales_and_zeros": self._scales_and_zeros(packed, dtype)}
        return tensors, partial(_mm, torch.ops.aten._weight_int4pack_mm, self.group_size)


def _mm(op, group_size: int, x: Tensor, tensors: dict[str, Tensor]) -> Tensor:
    return op(x, tensors["weight"], group_size, tensors["scales_and_zeros"])


def _dequantize_rows(packed: dict[str, Tensor], group_size: int, dtype: torch.dtype) -> Tensor:
    """(q - 8) * scale + zero computed in float32, ROW_CHUNK rows at a time, stored in `dtype`
    (one rounding per weight)."""
    qdata = packed["qdata"]
    out_features, in_features = qdata.shape[0], qdata.shape[1] * 2
    out = torch.empty(out_features, in_features, dtype=dtype, device=qdata.device)
    for start in range(0, out_features, ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        groups = unpack_nibbles(qdata[rows], torch.float32).view(-1, in_features // group_size, group_size)
        groups.sub_(8).mul_(packed["scale"][rows].float()[..., None]).add_(packed["zero"][rows].float()[..., None])
        out[rows] = groups.view(-1, in_features)
    return out
