"""Which of a layer's experts occupy its device slots: admission and eviction, no tensors.

Each expert of the layer, cached or not, has a score: its uses with exponentially decaying
weight, score = sum over past steps of use * decay ** (steps since). One knob spans the two
classic policies: decay -> 0 is LRU (only the latest use counts), decay = 1 is LFU (all uses
count forever). In between, an expert that is used often stays even if it skipped a few
tokens, and one that stopped being used fades out (LRFU, Lee et al. 2001).

Eviction takes the cached expert with the lowest score (ties: least recently used, then lowest
id). Admission depends on what it costs. A miss that is fetched anyway is always admitted: its
bytes already cross the bus, and a just-used expert is a good bet for the next token. A miss
computed on the CPU would need an extra copy to be cached, so it is admitted only if its score
beats the victim's (TinyLFU's idea): one-off experts stay on the CPU, hot ones move in.
Experts in use in the current step are protected: their slots cannot be taken mid-step.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

DEFAULT_DECAY = 0.95


class ExpertCache:
    def __init__(self, num_experts: int, slots: int, decay: float = DEFAULT_DECAY):
        if not 0 <= slots <= num_experts:
            raise ValueError(f"slots must be 0 to {num_experts}, got {slots}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.num_experts, self.slots, self.decay = num_experts, slots, decay
        self.expert_in: list[int | None] = [None] * slots
        self.slot_of: dict[int, int] = {}
        self._score = [0.0] * num_experts
        self._updated = [0] * num_experts  # step at which _score was last brought up to date
        self._last_use = [-1] * num_experts
        self.clock = 0
        self.hits = 0
        self.misses = 0

    def __contains__(self, expert: int) -> bool:
        return expert in self.slot_of

    def score(self, expert: int) -> float:
        return self._score[expert] * self.decay ** (self.clock - self._updated[expert])

    def record(self, uses: Mapping[int, float]) -> None:
        """One step: count hits and misses of the experts used, add their uses, advance the clock.

        `uses` maps each used expert to its weight for this step: the share of the step's
        tokens routed to it (1 for each expert of a decoded token).
        """
        self.clock += 1
        for expert, weight in uses.items():
            if expert in self.slot_of:
                self.hits += 1
            else:
                self.misses += 1
            self._score[expert] = self.score(expert) + weight
            self._updated[expert] = self.clock
            self._last_use[expert] = self.clock

    def victim(self, protected: Collection[int] = ()) -> int | None:
        """The cached expert eviction would take, or None if every cached one is protected."""
        candidates = [e for e in self.slot_of if e not in protected]
        if not candidates:
            return None
        return min(candidates, key=lambda e: (self.score(e), self._last_use[e], e))

    def admit(
        self, expert: int, protected: Collection[int] = (), *, force: bool = False, upcoming: bool = False
    ) -> tuple[int, int | None] | None:
        """Give `expert` a slot: a free one, or the victim's if `force` or if its score is higher.

        `upcoming`: the use is predicted for the next step (prefetch), not yet recorded; scores
        are compared as they will be then, this use included.
        Returns (slot, evicted expert or None), or None if not admitted.
        """
        if expert in self.slot_of:
            raise ValueError(f"expert {expert} is already cached")
        if self.slots == 0:
            return None
        if len(self.slot_of) < self.slots:
            slot = self.expert_in.index(None)
            evicted = None
        else:
            evicted = self.victim(protected)
            if evicted is None:
                return None
            mine, theirs = self.score(expert), self.score(evicted)
            if upcoming:
                mine, theirs = mine * self.decay + 1.0, theirs * self.decay
            if not force and mine <= theirs:
                return None
            slot = self.slot_of.pop(evicted)
        self.expert_in[slot] = expert
        self.slot_of[expert] = slot
        return slot, evicted

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
