"""Two 4-bit codes per byte, the order shared by the int4 and nf4 on-disk forms.

Element 2j sits in the high nibble and element 2j+1 in the low nibble of byte j. This is the order
bitsandbytes stores nf4 in and the order `aten._convert_weight_to_int4pack` (CUDA tinygemm) reads,
so both can consume the stored bytes without reshuffling.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows of 4-bit codes handled per step (re-laying, dequantizing): intermediates stay in cache
# (1.8x faster int4 prepare, 2.5x faster dequantize at 3328x2560). A multiple of every row block
# the CPU kernels lay out (32, 64).
ROW_CHUNK = 256


def pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 [..., 2n] of values 0..15 -> uint8 [..., n]."""
    codes = codes.to(torch.uint8)
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack_nibbles(packed: Tensor, dtype: torch.dtype = torch.uint8) -> Tensor:
    """uint8 [..., n] -> [..., 2n] of values 0..15 in `dtype` (inverse of pack_nibbles).

    Written straight into the result, so asking for int32 or float32 costs no uint8 copy first."""
    codes = torch.empty(*packed.shape, 2, dtype=dtype, device=packed.device)
    codes[..., 0] = packed >> 4
    codes[..., 1] = packed & 0x0F
    return codes.flatten(-2)


def pair_rows(qdata: Tensor, block: int, out: Tensor, feature_last: bool = False, chunk: int = ROW_CHUNK) -> None:
    """The layout CPU 4-bit kernels read, from stored bytes: per block of `block` rows, row r's code
    in the low nibble and row r + block/2's in the high one, one byte per input feature.

    qdata uint8 [rows, in/2] (rows a multiple of `block`; `chunk` too, so blocks never straddle
    chunks) -> out uint8 [rows, in/2] ordered [block, stored byte j, feature 2j or 2j+1, row r]
    (tinygemm's CPU layout) or, with `feature_last`, [block, j, row r, feature] (bitsandbytes').
    Works on bytes `chunk` rows at a time, so nothing is widened to int32 and it stays in cache.
    """
    rows, half = qdata.shape
    pair = block // 2
    dst = out.view(rows // block, half, pair, 2) if feature_last else out.view(rows // block, half, 2, pair)
    for start in range(0, rows, chunk):
        blocks = qdata[start : start + chunk].view(-1, block, half)
        low_rows, high_rows = blocks[:, :pair].transpose(1, 2), blocks[:, pair:].transpose(1, 2)  # [block, j, r]
        part = dst[start // block : (start + chunk) // block]
        even, odd = (part[..., 0], part[..., 1]) if feature_last else (part[:, :, 0], part[:, :, 1])
        # A stored byte holds feature 2j in its high nibble and 2j+1 in its low one.
        torch.bitwise_or(low_rows >> 4, high_rows & 0xF0, out=even)
        torch.bitwise_or(low_rows & 0x0F, high_rows << 4, out=odd)
