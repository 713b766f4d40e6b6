"""Every expert of a layer in host memory, one contiguous (pinned) row per expert.

A row holds all of one expert's payload tensors at fixed, aligned offsets (a `PayloadLayout`),
so moving an expert to the device is a single copy of one row into one slot, and the slot's
tensors are views at the same offsets. mixtral-offloading's idea; here the rows of a layer
share one allocation, so pinning costs one call per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..device import host_buffer
from ..placement import SLOT_ALIGN
from .codec import ExpertCodec


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class PayloadLayout:
    """Where each named tensor of one expert sits in a byte row."""

    entries: tuple[tuple[str, tuple[int, ...], torch.dtype, int], ...]  # name, shape, dtype, offset
    nbytes: int

    @classmethod
    def of(cls, tensors: dict[str, Tensor]) -> PayloadLayout:
        entries, offset = [], 0
        for name, t in tensors.items():
            entries.append((name, tuple(t.shape), t.dtype, offset))
            offset = _round_up(offset + t.numel() * t.element_size(), SLOT_ALIGN)
        return cls(tuple(entries), max(offset, SLOT_ALIGN))

    def views(self, row: Tensor) -> dict[str, Tensor]:
        """Typed tensors over a uint8 row (no copy)."""
        out = {}
        for name, shape, dtype, offset in self.entries:
            size = torch.Size(shape).numel() * dtype.itemsize
            out[name] = row[offset: offset + size].view(dtype).view(shape)
        return out

    def pack(self, tensors: dict[str, Tensor], row: Tensor) -> None:
        views = self.views(row)
        if set(views) != set(tensors):
            raise ValueError(f"payload tensors {sorted(tensors)} do not match the layout {sorted(views)}")
        for name, view in views.items():
            if tuple(tensors[name].shape) != tuple(view.shape) or tensors[name].dtype != view.dtype:
                raise ValueError(f"payload tensor '{name}' changed shape or dtype between experts")
            view.copy_(tensors[name])


def _packed_rows(codec: ExpertCodec, device: torch.device, pin: bool) -> tuple[PayloadLayout, Tensor]:
    """Every expert's payload for `device`, one row each."""
    first = codec.payload(0, device)
    layout = PayloadLayout.of(first)
    rows = host_buffer(layout.nbytes, codec.num_experts, pin)
    for e in range(codec.num_experts):
        layout.pack(first if e == 0 else codec.payload(e, device), rows[e])
    return layout, rows


class HostStore:
    """One layer's experts in host memory: rows laid out for the device (`fetch`: copied into
    slots and stream buffers) and rows the host computes on (`host_compute`). Where the two
    layouts are the same one set of rows serves both; only a layer that does both with a scheme
    whose CPU kernels want another layout (int4, nf4) holds two. A layer computed on the host
    only (--cpu-moe) holds the host layout alone: nothing of it is ever copied to the device."""

    def __init__(self, codec: ExpertCodec, device: torch.device, host: torch.device, pin: bool,
                 host_compute: bool = True, fetch: bool = True):
        if not (fetch or host_compute):
            raise ValueError("an expert store serves fetches, computing on the host, or both")
        n = codec.num_experts
        self.layout: PayloadLayout | None = None
        self.rows: Tensor | None = None
        if fetch:
            self.layout, self.rows = _packed_rows(codec, device, pin)
        self.host_layout, self.host_rows = self.layout, self.rows
        if host_compute and (not fetch or codec.layout_key(host) != codec.layout_key(device)):
            self.host_layout, self.host_rows = _packed_rows(codec, host, pin=False)
        self._host_views = [self.host_layout.views(self.host_rows[e]) for e in range(n)] if host_compute else []

    def row(self, expert: int) -> Tensor:
        """The bytes one copy moves to the device."""
        if self.rows is None:
            raise ValueError("this expert store holds no device rows (its layer computes on the host only)")
        return self.rows[expert]

    def host_payload(self, expert: int) -> dict[str, Tensor]:
        return self._host_views[expert]

    @property
    def nbytes(self) -> int:
        sets = {id(rows): rows for rows in (self.rows, self.host_rows) if rows is not None}
        return sum(rows.numel() for rows in sets.values())
