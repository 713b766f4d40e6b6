"""OffloadedExperts: a drop-in for one layer's `mlp.experts` whose experts live in host memory.

Per forward step (one layer, N tokens):
1. Count the tokens per expert; cached experts are hits, the rest misses.
2. Decide each miss: fetch (into a slot the cache admits it to, else a stream buffer) or
   compute on the host (and, if the cache admits it, promote it into a slot in the background).
3. Start the fetch copies, then the next layer's prefetch, on the side stream.
4. Run: hits on the device first (they are ready), host experts on the CPU meanwhile, then
   the fetched ones as their copies land. Each group goes through `routed_sum`, the model's
   one dispatch; their outputs add up to the routed sum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..device import CopyStream, Marker, Ready
from ..moe import DispatchesOnHost, routed_sum
from .cache import ExpertCache
from .codec import ExpertCodec
from .host_store import HostStore
from .policy import CPU, FETCH, MissPolicy
from .stats import OffloadStats


@dataclass
class OffloadContext:
    """What every offloaded layer shares."""

    device: torch.device
    host: torch.device
    copier: CopyStream
    policy: MissPolicy
    stats: OffloadStats
    stream_pool: StreamPool | None = None
    first_layer: int = 0  # the layer that counts tokens (every token passes every layer)


class DeviceSlots:
    """A layer's cache slots: one device byte row each, with copy and use ordering."""

    def __init__(self, rows: Tensor, store: HostStore):
        self.rows = rows
        self.views = [store.layout.views(rows[s]) for s in range(rows.shape[0])]
        self.ready: list[Ready | None] = [None] * rows.shape[0]  # copy in flight into the slot
        self.freed: list[Marker | None] = [None] * rows.shape[0]  # last compute that read the slot
        self.prefetched = [False] * rows.shape[0]


@dataclass
class StreamPool:
    """Device buffers that carry misses no slot keeps: fill one while the other computes."""

    rows: Tensor  # [buffers, bytes] on the device
    freed: list[Marker | None] = field(default_factory=list)
    turn: int = 0

    def __post_init__(self):
        self.freed = [None] * self.rows.shape[0]

    def take(self) -> int:
        index = self.turn
        self.turn = (self.turn + 1) % self.rows.shape[0]
        return index


class OffloadedExperts(DispatchesOnHost):
    """Routed experts of layer `layer`, stored in `store`, `cache.slots` of them on the device.

    `host_only` layers (--cpu-moe, --n-cpu-moe) have no slots and compute every expert on the host.
    Holds no parameters or buffers: `model.to()` must not move the host store.
    """

    def __init__(self, layer: int, codec: ExpertCodec, store: HostStore, cache: ExpertCache,
                 slot_rows: Tensor | None, ctx: OffloadContext, host_only: bool = False):
        super().__init__()
        self.layer = layer
        self.num_experts = codec.num_experts
        self.codec, self.store, self.cache, self.ctx = codec, store, cache, ctx
        self.host_only = host_only
        self.slots = DeviceSlots(slot_rows, store) if slot_rows is not None else None
        # Called with this layer's MoE input after its own copies are queued (next-layer prefetch).
        self.after_dispatch: Callable[[Tensor], None] | None = None
        self._streaming: dict[int, tuple[int, Ready]] = {}  # streamed expert -> (buffer, copy)
        self._stream_order: list[int] = []

    # ----- the step ---------------------------------------------------------------------------

    def forward(self, x: Tensor, top_idx: Tensor, top_w: Tensor) -> Tensor:
        return self.host_dispatch(x, top_idx, top_w)  # one opaque op in a compiled step

    def dispatch_on_host(self, x: Tensor, top_idx: Tensor, top_w: Tensor) -> Tensor:
        ctx = self.ctx
        n = x.shape[0]
        counts = torch.bincount(top_idx.reshape(-1), minlength=self.num_experts).tolist()
        used = [e for e in range(self.num_experts) if counts[e]]
        stats = ctx.stats.phase(n)
        if self.layer == ctx.first_layer:
            stats.tokens += n
        hits = [e for e in used if e in self.cache]
        misses = sorted((e for e in used if e not in self.cache), key=lambda e: -counts[e])
        self.cache.record({e: counts[e] / n for e in used})
        stats.hits += len(hits)
        stats.misses += len(misses)

        in_slots, streamed, on_host, promote = [], [], [], []
        protected = set(used)
        for e in misses:
            serve = self._serve(counts[e])
            admitted = self.cache.admit(e, protected, force=serve == FETCH) is not None
            if serve == FETCH:
                (in_slots if admitted else streamed).append(e)
            else:
                on_host.append(e)
                if admitted:
                    promote.append(e)
        for e in in_slots:
            self._load_slot(e, stats)
        self._stream_order = streamed
        for e in streamed[: self._pool_size()]:
            self._load_stream(e, stats)
        stats.fetched += len(in_slots) + len(streamed)
        stats.streamed += len(streamed)
        stats.cpu_computed += len(on_host)

        if on_host:  # before any device work is queued: a device->host copy waits for all of it
            xh, idx_h, w_h = x.to(ctx.host), top_idx.to(ctx.host), top_w.to(ctx.host)
            stats.bytes_to_host += sum(t.numel() * t.element_size() for t in (x, top_idx, top_w))
        if self.after_dispatch is not None:
            self.after_dispatch(x)

        out = None
        if hits:
            out = routed_sum(x, top_idx, top_w, self.num_experts, self._run_cached, hits)
        if on_host:
            part = routed_sum(xh, idx_h, w_h, self.num_experts, self._run_host, on_host).to(ctx.device)
            stats.bytes_to_device += part.numel() * part.element_size()
            out = part if out is None else out + part
        fetched = in_slots + streamed
        if fetched:
            part = routed_sum(x, top_idx, top_w, self.num_experts, self._run_fetched, fetched)
            out = part if out is None else out + part
        for e in promote:
            self._load_slot(e, stats)
            stats.promoted += 1
        return out

    def _serve(self, tokens: int) -> str:
        # Host layers, and a plan with no stream buffers, have nowhere on the device to run a miss.
        if self.host_only or self.ctx.stream_pool is None:
            return CPU
        return self.ctx.policy.serve(tokens)

    def _pool_size(self) -> int:
        return self.ctx.stream_pool.rows.shape[0] if self.ctx.stream_pool is not None else 0

    # ----- copies -----------------------------------------------------------------------------

    def _load_slot(self, expert: int, stats, prefetched: bool = False) -> None:
        slot = self.cache.slot_of[expert]
        slots = self.slots
        row = self.store.row(expert)
        slots.ready[slot] = self.ctx.copier.copy(slots.rows[slot, : row.numel()], row, after=slots.freed[slot])
        slots.prefetched[slot] = prefetched
        stats.bytes_to_device += row.numel()

    def _load_stream(self, expert: int, stats) -> None:
        pool = self.ctx.stream_pool
        index = pool.take()
        row = self.store.row(expert)
        ready = self.ctx.copier.copy(pool.rows[index, : row.numel()], row, after=pool.freed[index])
        self._streaming[expert] = (index, ready)
        stats.bytes_to_device += row.numel()

    def prefetch(self, guessed: dict[int, int], tokens: int) -> None:
        """Start copying guessed experts (expert -> tokens guessed for it) into slots the cache
        admits them to. A guess whose miss would be fetched anyway is always admitted: copying
        it now costs nothing extra; one that would run on the CPU must win on score."""
        if self.slots is None or self.host_only:
            return
        stats = self.ctx.stats.phase(tokens)
        protected = set(guessed)
        for e in sorted(guessed, key=lambda e: -guessed[e]):
            if e in self.cache:
                continue
            force = self._serve(guessed[e]) == FETCH
            if self.cache.admit(e, protected, force=force, upcoming=True) is None:
                continue
            self._load_slot(e, stats, prefetched=True)
            stats.prefetched += 1

    # ----- running one expert ------------------------------------------------------------------

    def _run_cached(self, expert: int, x: Tensor) -> Tensor:
        slots = self.slots
        slot = self.cache.slot_of[expert]
        if slots.ready[slot] is not None:
            self.ctx.stats.phase(x.shape[0]).stall_seconds += slots.ready[slot].wait()
            slots.ready[slot] = None
        if slots.prefetched[slot]:
            slots.prefetched[slot] = False
            self.ctx.stats.phase(x.shape[0]).prefetch_used += 1
        y = self.codec.compute(slots.views[slot], x)
        slots.freed[slot] = Marker(self.ctx.device)
        return y

    def _run_fetched(self, expert: int, x: Tensor) -> Tensor:
        if expert in self.cache:
            return self._run_cached(expert, x)
        pool = self.ctx.stream_pool
        stats = self.ctx.stats.phase(x.shape[0])
        index, ready = self._streaming.pop(expert)
        stats.stall_seconds += ready.wait()
        y = self.codec.compute(self.store.layout.views(pool.rows[index]), x)
        pool.freed[index] = Marker(self.ctx.device)
        # This buffer is free once the compute just queued is done: stream the expert that is
        # one pool-length behind into it, so one buffer fills while the other computes.
        following = self._stream_order.index(expert) + pool.rows.shape[0]
        if following < len(self._stream_order):
            self._load_stream(self._stream_order[following], stats)
        return y

    def _run_host(self, expert: int, x: Tensor) -> Tensor:
        return self.codec.compute(self.store.host_payload(expert), x)

    def run_expert(self, expert: int, x: Tensor) -> Tensor:
        """One expert on x (device rows), wherever it is: from its slot, else on the host."""
        if expert in self.cache:
            return self._run_cached(expert, x)
        return self._run_host(expert, x.to(self.ctx.host)).to(x.device)

    def extra_repr(self) -> str:
        slots = 0 if self.slots is None else self.cache.slots
        return f"layer={self.layer}, experts={self.num_experts}, slots={slots}, host_only={self.host_only}"
