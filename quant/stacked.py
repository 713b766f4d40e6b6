"""Many prepared weights of one shape (a layer's experts) held as one block per kernel tensor.

A decode step that picks its experts on the device cannot index a Python list with their ids
without reading them on the host, which a CUDA graph cannot hold. With every expert's kernel
tensors in rows of one block, `gather(ids)` copies the chosen experts' rows by device index
(index_select) and the kernels run on the copies: no host read, at the price of copying the
active weights once per step (gpt-fast's Mixtral does the same with its expert weights).

Each expert's row starts on a KERNEL_ALIGNMENT boundary, as kernels want their data.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .base import KERNEL_ALIGNMENT, Prepared


@dataclass(frozen=True)
class StackedPrepared:
    """`experts[e]` is expert e's Prepared, its tensors views into `blocks` ([experts, row elements])."""

    experts: tuple[Prepared, ...]
    blocks: dict[str, Tensor]

    def gather(self, ids: Tensor) -> list[dict[str, Tensor]]:
        """The kernel tensors of experts `ids` (a device tensor [k]), one dict per id, in order."""
        like = self.experts[0].tensors
        picked = {name: block.index_select(0, ids) for name, block in self.blocks.items()}
        return [{name: picked[name][j, : t.numel()].view(t.shape) for name, t in like.items()}
                for j in range(ids.shape[0])]


def stack_prepared(prepared: Iterable[Prepared], count: int) -> StackedPrepared:
    """Copy `count` prepared weights of one layout into shared blocks; each source is dropped
    once copied, so a generator that prepares them one by one never holds two copies of all."""
    blocks: dict[str, Tensor] = {}
    experts = []
    for index, one in enumerate(prepared):
        if not blocks:
            blocks = {name: _block(count, t) for name, t in one.tensors.items()}
        views = {}
        for name, t in one.tensors.items():
            views[name] = blocks[name][index, : t.numel()].view(t.shape)
            views[name].copy_(t)
        experts.append(replace(one, tensors=views))
    if len(experts) != count:
        raise ValueError(f"expected {count} prepared weights, got {len(experts)}")
    return StackedPrepared(tuple(experts), blocks)


def _block(count: int, like: Tensor) -> Tensor:
    per_row = KERNEL_ALIGNMENT // like.element_size()
    row = -(-like.numel() // per_row) * per_row
    return torch.empty(count, row, dtype=like.dtype, device=like.device)
