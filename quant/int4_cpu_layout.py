"""The weight layout of the int4 CPU kernel (`aten._weight_int4pack_mm_for_cpu`), made fast.

PyTorch's packer (`_convert_weight_to_int4pack_for_cpu`) wants int32 codes, four bytes per 4-bit
weight, so preparing a model meant widening every matrix eightfold first: about 17 ms per Aria
expert on 2 cores, half a minute for the whole model at every start. Its layout is simple on
vectorised builds: rows go in blocks of BLOCK_N (64 with AVX-512, 32 with AVX2), and byte
[block, k, j] holds row j's code for input k in its low nibble and row j + BLOCK_N/2's in its high
one. `cpu_int4_layout` builds that straight from the stored bytes (quant.nibbles.pair_rows),
about 3x faster, with no int32 intermediate.

The layout depends on how PyTorch was built (and on the CPU it picked kernels for), so it is
not assumed: the first call compares the fast path with the packer on a probe matrix and uses
whichever block size matches; where none does (another build, another CPU) every row goes
through the packer as before. Rows past the last whole block (the packer lays those out
another way) always do.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from .nibbles import ROW_CHUNK, pair_rows, unpack_nibbles

_BLOCK_SIZES = (64, 32)  # ROW_CHUNK is a multiple of each


def _packer(qdata: Tensor) -> Tensor:
    """PyTorch's own packer over stored bytes, ROW_CHUNK rows at a time (it lays out blocks of
    rows independently, so chunks give the whole matrix's layout; checked in the tests)."""
    return torch.cat([
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(qdata[r : r + ROW_CHUNK], torch.int32), 1)
        for r in range(0, qdata.shape[0], ROW_CHUNK)
    ])


@cache
def packer_block_rows() -> int:
    """The BLOCK_N the packer uses in this process, or 0 when its layout is not the one above."""
    probe = torch.randint(0, 256, (2 * _BLOCK_SIZES[0], 64), dtype=torch.uint8, device="cpu",
                          generator=torch.Generator().manual_seed(0))
    expected = _packer(probe)
    for block in _BLOCK_SIZES:
        mine = torch.empty_like(expected)
        pair_rows(probe, block, mine)
        if torch.equal(mine, expected):
            return block
    return 0


def cpu_int4_layout(qdata: Tensor) -> Tensor:
    """uint8 [N, K/2] stored codes -> the CPU kernel's uint8 [N, K/2] weight."""
    qdata = qdata.contiguous()
    block = packer_block_rows()
    whole = qdata.shape[0] - qdata.shape[0] % block if block else 0
    out = torch.empty_like(qdata)
    if whole:
        pair_rows(qdata[:whole], block, out[:whole])
    if whole < qdata.shape[0]:
        out[whole:] = _packer(qdata[whole:])
    return out
