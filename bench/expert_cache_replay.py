"""Replay routing traces through the expert cache: hit rate and bytes moved per decoded token,
ours (decayed-frequency eviction + admission) against a plain per-layer LRU, side by side.

    python bench/expert_cache_replay.py                       # synthetic Aria-shaped trace
    python bench/expert_cache_replay.py --zipf 1.1 --stickiness 0.5 --slots 16 32 48
    python bench/expert_cache_replay.py --record DIR --tokens 200   # route a real checkpoint
    python bench/expert_cache_replay.py --trace trace.json    # {"num_experts", "top_k", "steps"}

A trace is one entry per decoded token and layer: the experts the router picked. Synthetic
traces give each layer a Zipf-shaped expert popularity (a random order per layer) and make a
token reuse each of the previous token's choices with probability `stickiness` (routing is
known to be skewed and temporally correlated; real traces come from --record).

Two regimes, for the two ways of serving a miss (runtime.offload.policy):
- fetch: every miss is copied to the device (into a slot or a stream buffer), so bytes moved
  per token = misses x expert bytes, and the hit rate is the whole story.
- cpu: misses run on the CPU (activations are tiny); only experts copied into a slot cross the
  bus. LRU copies every miss; ours promotes only experts whose score beats the victim's, so it
  trades some hit rate for far fewer bytes.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import OrderedDict
from pathlib import Path

from quant import get_scheme
from runtime.config import AriaConfig
from runtime.known_configs import aria_config_dict
from runtime.offload.cache import DEFAULT_DECAY, ExpertCache
from runtime.weight_bytes import weight_bytes

Trace = list[list[list[int]]]  # [token][layer] -> experts


class LRU:
    """The baseline: a per-layer LRU that admits every miss, evicting the least recently used
    expert not needed in the current step."""

    def __init__(self, slots: int):
        self.slots = slots
        self.order: OrderedDict[int, None] = OrderedDict()

    def step(self, experts: list[int]) -> tuple[int, int]:
        """-> (hits, experts copied into the cache)."""
        hits = sum(1 for e in experts if e in self.order)
        for e in experts:
            if e in self.order:
                self.order.move_to_end(e)
        copied = 0
        for e in experts:
            if e in self.order or self.slots == 0:
                continue
            if len(self.order) >= self.slots:
                victim = next((v for v in self.order if v not in experts), None)
                if victim is None:
                    continue  # every slot holds an expert in use: stream this one
                del self.order[victim]
            self.order[e] = None
            copied += 1
        return hits, copied


class Ours:
    """runtime.offload's ExpertCache driven the way OffloadedExperts drives it: misses that are
    fetched are always admitted (`fetch`); misses computed on the CPU are promoted into a slot
    only when their score beats the victim's (`cpu`)."""

    def __init__(self, num_experts: int, slots: int, decay: float, mode: str):
        self.cache = ExpertCache(num_experts, slots, decay)
        self.force = mode == "fetch"

    def step(self, experts: list[int]) -> tuple[int, int]:
        hits = sum(1 for e in experts if e in self.cache)
        self.cache.record({e: 1.0 for e in experts})
        protected = set(experts)
        copied = sum(1 for e in experts
                     if e not in self.cache and self.cache.admit(e, protected, force=self.force) is not None)
        return hits, copied


def synthetic_trace(layers: int, experts: int, top_k: int, tokens: int, zipf: float, stickiness: float,
                    seed: int) -> Trace:
    rng = random.Random(seed)
    popularity = []
    for _ in range(layers):
        order = list(range(experts))
        rng.shuffle(order)
        weights = [0.0] * experts
        for rank, e in enumerate(order):
            weights[e] = 1.0 / (rank + 1) ** zipf
        popularity.append(weights)
    trace: Trace = []
    previous: list[list[int]] | None = None
    for _ in range(tokens):
        step = []
        for layer in range(layers):
            chosen: list[int] = []
            if previous is not None:
                chosen = [e for e in previous[layer] if rng.random() < stickiness]
            while len(chosen) < top_k:
                e = rng.choices(range(experts), weights=popularity[layer])[0]
                if e not in chosen:
                    chosen.append(e)
            step.append(sorted(chosen))
        trace.append(step)
        previous = step
    return trace


def record_trace(checkpoint: str, tokens: int, seed: int) -> tuple[Trace, int, int]:
    """Greedy-decode `tokens` tokens from a random prompt and keep each decode step's routing."""
    import torch

    from runtime.generate import Session
    from runtime.loader import load_model

    model = load_model(checkpoint, dtype=torch.float32)
    text = model.config.text
    steps: list[list[list[int]]] = []
    current: list[list[int]] = []

    def hook(module, args, logits):
        if logits.shape[0] == 1:  # decode steps only
            current.append(sorted(torch.topk(logits[0], text.moe_topk).indices.tolist()))

    for layer in model.language_model.model.layers:
        layer.mlp.router.register_forward_hook(hook)
    gen = torch.Generator().manual_seed(seed)
    image_id = model.config.image_token_index
    prompt = [t for t in torch.randint(10, text.vocab_size, (64,), generator=gen).tolist() if t != image_id]
    session = Session(model, len(prompt) + tokens + 1)
    logits = session.prefill(prompt)
    for _ in range(tokens):
        current.clear()
        token = logits.argmax(-1)
        logits = session.decode(token)
        steps.append(list(current))
    return steps, text.moe_num_experts, text.moe_topk


def replay(trace: Trace, make) -> tuple[float, float]:
    """-> (hit rate, experts copied per token) for one cache per layer made by `make()`."""
    caches = [make() for _ in trace[0]]
    hits = uses = copied = 0
    for step in trace:
        for cache, experts in zip(caches, step):
            h, c = cache.step(experts)
            hits, uses, copied = hits + h, uses + len(experts), copied + c
    return hits / uses, copied / len(trace)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", help="JSON trace file")
    p.add_argument("--record", metavar="DIR", help="record a trace from this checkpoint")
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--zipf", type=float, default=0.8)
    p.add_argument("--stickiness", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slots", type=int, nargs="+", default=None, help="slots per layer to try")
    p.add_argument("--decay", type=float, default=DEFAULT_DECAY)
    p.add_argument("--scheme", default="int4", help="expert format for the byte counts (bf16, int8, int4, nf4)")
    args = p.parse_args(argv)

    if args.trace:
        raw = json.loads(Path(args.trace).read_text())
        trace, experts, top_k = raw["steps"], raw["num_experts"], raw["top_k"]
        source = args.trace
    elif args.record:
        trace, experts, top_k = record_trace(args.record, args.tokens, args.seed)
        source = f"recorded from {args.record}"
    else:
        trace = synthetic_trace(args.layers, args.experts, args.top_k, args.tokens, args.zipf,
                                args.stickiness, args.seed)
        experts, top_k = args.experts, args.top_k
        source = f"synthetic (zipf {args.zipf}, stickiness {args.stickiness}, seed {args.seed})"

    aria = AriaConfig.from_dict(aria_config_dict())
    scheme = None if args.scheme == "bf16" else get_scheme(args.scheme)
    expert_mb = weight_bytes(aria, scheme).expert / 1e6
    slots_list = args.slots or [s for s in (experts // 8, experts // 4, experts // 2, 3 * experts // 4) if s]
    print(f"trace: {source}; {len(trace)} tokens x {len(trace[0])} layers, top-{top_k} of {experts}")
    print(f"expert = {expert_mb:.2f} MB ({args.scheme}, real Aria shapes); ours: decay {args.decay}")
    print()
    header = ("slots", "fetch: LRU hit", "ours hit", "LRU MB/tok", "ours MB/tok",
              "cpu: LRU hit", "ours hit", "LRU MB/tok", "ours MB/tok")
    print("  ".join(f"{h:>14}" if i else f"{h:>5}" for i, h in enumerate(header)))
    uses = len(trace[0]) * top_k  # expert uses per token
    for slots in slots_list:
        lru_hit, lru_copied = replay(trace, lambda s=slots: LRU(s))
        fetch_hit, _ = replay(trace, lambda s=slots: Ours(experts, s, args.decay, "fetch"))
        cpu_hit, cpu_copied = replay(trace, lambda s=slots: Ours(experts, s, args.decay, "cpu"))
        row = (
            f"{slots:>5}",
            # fetch: every miss crosses the bus once.
            f"{100 * lru_hit:>13.1f}%", f"{100 * fetch_hit:>13.1f}%",
            f"{(1 - lru_hit) * uses * expert_mb:>14.1f}", f"{(1 - fetch_hit) * uses * expert_mb:>14.1f}",
            # cpu: misses stay on the CPU; only experts copied into slots cross the bus.
            f"{100 * lru_hit:>13.1f}%", f"{100 * cpu_hit:>13.1f}%",
            f"{lru_copied * expert_mb:>14.1f}", f"{cpu_copied * expert_mb:>14.1f}",
        )
        print("  ".join(row))


if __name__ == "__main__":
    main()
