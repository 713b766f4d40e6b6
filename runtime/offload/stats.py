"""Counters of the offload engine, split by phase (prefill steps vs single-token decode steps).

An expert *use* is one expert needed by one layer in one forward step; it is a hit if the
expert was on the device (resident slot, possibly prefetched), else a miss, served by a fetch
(kept in a slot or streamed through a buffer) or by computing it on the CPU. Promotions and
prefetches are background copies into slots, off the critical path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class PhaseStats:
    tokens: int = 0
    hits: int = 0
    misses: int = 0
    fetched: int = 0  # misses copied to the device before running there
    streamed: int = 0  # of those, through a stream buffer (no slot kept them)
    cpu_computed: int = 0
    promoted: int = 0  # CPU-served misses also copied into a slot for next time
    prefetched: int = 0  # copies started from the next-layer guess
    prefetch_used: int = 0  # prefetched experts that were then used
    bytes_to_device: int = 0
    bytes_to_host: int = 0
    stall_seconds: float = 0.0  # host time spent waiting for copies to land

    @property
    def hit_rate(self) -> float:
        uses = self.hits + self.misses
        return self.hits / uses if uses else 0.0

    def per_token(self, value: float) -> float:
        return value / self.tokens if self.tokens else 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(
            hit_rate=self.hit_rate,
            fetched_per_token=self.per_token(self.fetched),
            cpu_computed_per_token=self.per_token(self.cpu_computed),
            bytes_moved_per_token=self.per_token(self.bytes_to_device + self.bytes_to_host),
        )
        return out


class OffloadStats:
    def __init__(self):
        self.prefill = PhaseStats()
        self.decode = PhaseStats()

    def phase(self, tokens: int) -> PhaseStats:
        return self.decode if tokens == 1 else self.prefill

    def reset(self) -> None:
        self.prefill, self.decode = PhaseStats(), PhaseStats()

    def total(self) -> PhaseStats:
        both = PhaseStats()
        for f in fields(PhaseStats):
            setattr(both, f.name, getattr(self.prefill, f.name) + getattr(self.decode, f.name))
        return both

    def as_dict(self) -> dict:
        """For --json: both phases with per-token rates."""
        return {"prefill": self.prefill.as_dict(), "decode": self.decode.as_dict()}

    def rows(self) -> list[tuple[str, str]]:
        """For --verbose: the decode numbers people ask for, then prefill's."""
        out = []
        for name, p in (("decode", self.decode), ("prefill", self.prefill)):
            if not p.tokens:
                continue
            out += [
                (f"{name} expert hit rate", f"{100 * p.hit_rate:.1f}%"),
                (f"{name} experts fetched / token", f"{p.per_token(p.fetched):.2f}"),
                (f"{name} experts on CPU / token", f"{p.per_token(p.cpu_computed):.2f}"),
                (f"{name} MB moved / token", f"{p.per_token(p.bytes_to_device + p.bytes_to_host) / 1e6:.2f}"),
                (f"{name} stalled on copies", f"{p.stall_seconds:.3f} s"),
            ]
        return out
