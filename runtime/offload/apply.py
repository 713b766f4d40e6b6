"""Follow a Plan on a loaded model: experts to the host store and device slots, the rest to the device.

`apply_offload(model, plan, device, host)` takes a model whose weights sit in host memory (as
`load_model(..., device="cpu")` leaves them: mmap'd, no copy), replaces the `mlp.experts` of
every layer the plan offloads with an `OffloadedExperts`, moves everything else to `device`,
measures the miss costs and wires the next-layer prefetch. It returns the `OffloadEngine`,
which holds the statistics and a ledger of the bytes placed on each side.

"device" and "host" are parameters: tests pass "cpu" for both and check the ledger, so the
whole path runs without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..device import CopyStream, as_device
from ..errors import PlacementError
from ..model import AriaForConditionalGeneration
from ..placement import CACHE, DEVICE, HOST, Plan, computes_on_host
from ..quantized_model import move_model
from .cache import DEFAULT_DECAY, ExpertCache
from .codec import codec_for
from .experts import OffloadContext, OffloadedExperts, StreamPool
from .host_store import HostStore
from .policy import Costs, MissPolicy, measure_costs
from .prefetch import NextLayerGuess
from .stats import OffloadStats


@dataclass
class MemoryLedger:
    """Bytes the engine placed, by side and by what: the device side must stay within the plan."""

    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)

    def add(self, side: str, what: str, nbytes: int) -> None:
        book = self.device if side == "device" else self.host
        book[what] = book.get(what, 0) + nbytes

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())


@dataclass
class OffloadEngine:
    plan: Plan
    context: OffloadContext
    layers: dict[int, OffloadedExperts]
    ledger: MemoryLedger
    costs: Costs | None
    hooks: list = field(default_factory=list)

    @property
    def stats(self) -> OffloadStats:
        return self.context.stats

    def hit_rates(self) -> dict[int, float]:
        """Per offloaded layer, the share of expert uses found on the device since the start."""
        return {layer: experts.cache.hit_rate for layer, experts in self.layers.items()}


def _check_plan(model: AriaForConditionalGeneration, plan: Plan) -> None:
    t = model.config.text
    if len(plan.layers) != t.num_hidden_layers or plan.num_experts != t.moe_num_experts:
        raise PlacementError(
            f"the placement plan is for {len(plan.layers)} layers of {plan.num_experts} experts but the model "
            f"has {t.num_hidden_layers} of {t.moe_num_experts}; plan again for this model"
        )
    if plan.dtype != model.dtype:
        raise PlacementError(f"the placement plan is for {plan.dtype} but the model is {model.dtype}; plan again")


def _device_rows(rows: int, nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty((rows, nbytes), dtype=torch.uint8, device=device)


def apply_offload(
    model: AriaForConditionalGeneration,
    plan: Plan,
    device: torch.device | str,
    host: torch.device | str = "cpu",
    *,
    miss_policy: str | None = None,
    prefetch: bool = True,
    costs: Costs | None = None,
    decay: float = DEFAULT_DECAY,
) -> OffloadEngine:
    """Place `model` as `plan` says. `miss_policy` overrides the plan's (auto, fetch, cpu);
    `costs` skips the start-up measurement (tests, or numbers saved from an earlier run)."""
    _check_plan(model, plan)
    device, host = as_device(device), torch.device(host)
    mode = miss_policy or plan.miss_policy
    ledger = MemoryLedger()
    layers = model.language_model.model.layers
    ctx = OffloadContext(device, host, CopyStream(device), MissPolicy("fetch"), OffloadStats())
    offloaded: dict[int, OffloadedExperts] = {}
    for lp in plan.layers:
        if lp.where == DEVICE:
            continue
        codec = codec_for(layers[lp.layer].mlp.experts)
        fetch = lp.where == CACHE  # a host layer never copies an expert to the device
        store = HostStore(codec, device, host, pin=fetch and device.type == "cuda",
                          host_compute=computes_on_host(lp.where, mode), fetch=fetch)
        codec.release_sources()
        if fetch and store.layout.nbytes > plan.slot_bytes:
            raise PlacementError(
                f"one expert of layer {lp.layer} takes {store.layout.nbytes} bytes on the device but the plan "
                f"allows {plan.slot_bytes}; plan with the model's own precision and bfloat16 compute"
            )
        ledger.add("host", "expert store", store.nbytes)
        slots = lp.slots if lp.where == CACHE else 0
        slot_rows = _device_rows(slots, plan.slot_bytes, device) if slots else None
        if slots:
            ledger.add("device", "expert slots", slot_rows.numel())
        experts = OffloadedExperts(lp.layer, codec, store, ExpertCache(codec.num_experts, slots, decay),
                                   slot_rows, ctx, host_only=lp.where == HOST)
        layers[lp.layer].mlp.experts = experts
        offloaded[lp.layer] = experts

    move_model(model, device)  # what is left: dense weights and resident experts
    ledger.add("device", "weights", sum(p.numel() * p.element_size() for p in model.parameters()))
    if plan.stream_buffers and any(not e.host_only for e in offloaded.values()):
        ctx.stream_pool = StreamPool(_device_rows(plan.stream_buffers, plan.slot_bytes, device))
        ledger.add("device", "stream buffers", ctx.stream_pool.rows.numel())
    if offloaded:
        ctx.first_layer = min(offloaded)
    if mode == "auto" and costs is None:
        costs = _measure(offloaded, ctx, model.config.text.hidden_size, plan.dtype)
    # With no layer able to fetch there is nothing to choose: every miss runs on the host.
    ctx.policy = MissPolicy("cpu") if mode == "auto" and costs is None else MissPolicy(mode, costs)
    engine = OffloadEngine(plan, ctx, offloaded, ledger, costs)
    if prefetch:
        _wire_prefetch(model, engine)
    return engine


def _measure(offloaded: dict[int, OffloadedExperts], ctx: OffloadContext, hidden: int, dtype) -> Costs | None:
    """Costs from one offloaded layer that can fetch; None if every offloaded layer is host-only."""
    for experts in offloaded.values():
        if experts.host_only or ctx.stream_pool is None:
            continue
        scratch = ctx.stream_pool.rows[0]
        return measure_costs(experts.codec, experts.store, scratch, ctx.copier, ctx.device, ctx.host, hidden, dtype)
    return None


def _wire_prefetch(model: AriaForConditionalGeneration, engine: OffloadEngine) -> None:
    """Layer l guesses layer l+1's experts, for every l+1 that has slots to prefetch into."""
    layers = model.language_model.model.layers
    for nxt, target in engine.layers.items():
        if nxt == 0 or target.host_only or target.cache.slots == 0:
            continue
        this_layer, next_layer = layers[nxt - 1], layers[nxt]
        guess = NextLayerGuess(next_layer.mlp, this_layer.post_attention_layernorm.weight,
                               next_layer.post_attention_layernorm.weight, target)
        source = this_layer.mlp.experts
        if isinstance(source, OffloadedExperts):
            source.after_dispatch = guess  # after that layer's own copies are queued
        else:
            engine.hooks.append(this_layer.mlp.register_forward_pre_hook(guess.hook))
