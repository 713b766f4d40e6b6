"""Two 4-bit codes per byte, the order shared by the int4 and nf4 on-disk forms.

Element 2j sits in the high nibble and element 2j+1 in the low nibble of byte j. This is the order
bitsandbytes stores nf4 in and the order `aten._convert_weight_to_int4pack` (CUDA tinygemm) reads,
so both can consume the stored bytes without reshuffling.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
