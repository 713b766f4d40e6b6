"""A Plan as table rows of plain strings, for `aria plan` to print with Rich (or anything else)."""

from __future__ import annotations

from itertools import groupby

from .errors import PlacementError
from .placement import CACHE, DEVICE, HOST, LayerPlacement, Plan
from .sizes import human_size

PLAN_COLUMNS = ("part", "where", "size")
SUMMARY_COLUMNS = ("GPU", "weights", "experts on GPU", "slots per layer", "GPU used", "CPU memory",
                   "decode bound")


def _layer_ranges(layers: tuple[LayerPlacement, ...]) -> list[tuple[str, int, int, int]]:
    """Runs of consecutive layers placed alike: (where, slots, first, last)."""
    runs = []
    for (where, slots), group in groupby(layers, key=lambda lp: (lp.where, lp.slots)):
        members = list(group)
        runs.append((where, slots, members[0].layer, members[-1].layer))
    return runs


def _span(first: int, last: int) -> str:
    return f"layer {first}" if first == last else f"layers {first}-{last}"


def _speed(plan: Plan) -> str:
    return (f"{plan.decode_tokens_per_second(0):.0f} tok/s short context, "
            f"{plan.decode_tokens_per_second(plan.context):.0f} at {plan.context}")


def plan_rows(plan: Plan) -> list[tuple[str, str, str]]:
    """One row per thing the plan places: what, where, how big; then totals and the speed bound."""
    e = plan.num_experts
    rows = [
        (f"dense weights ({plan.scheme}: attention, shared experts, embeddings, vision)", "GPU",
         human_size(plan.dense_bytes)),
        (f"KV cache ({plan.context} tokens)", "GPU", human_size(plan.kv_bytes)),
        (f"workspace ({plan.prefill_chunk}-token prefill chunks, runtime reserve)", "GPU",
         human_size(plan.workspace_bytes)),
    ]
    if plan.graph_bytes:
        rows.append(("compiled decode's CUDA graphs (their own memory pool)", "GPU", human_size(plan.graph_bytes)))
    for where, slots, first, last in _layer_ranges(plan.layers):
        n = last - first + 1
        experts = f"routed experts, {_span(first, last)}"
        if where == DEVICE:
            rows.append((f"{experts}: all {e} resident", "GPU", human_size(n * e * plan.expert_bytes)))
        elif where == CACHE:
            rows.append((f"{experts}: {slots} of {e} cached in slots", "GPU", human_size(n * slots * plan.slot_bytes)))
            rows.append((f"{experts}: all {e}, misses {plan.miss_policy}", "CPU memory (pinned)",
                         human_size(n * e * plan.expert_bytes)))
        elif where == HOST:
            rows.append((f"{experts}: all {e}, computed on the CPU", "CPU memory", human_size(n * e * plan.expert_bytes)))
    if plan.host_layout_copy_bytes:
        rows.append((f"cached routed experts, misses on the CPU: {plan.scheme}'s CPU layout, a second copy", "CPU memory",
                      human_size(plan.host_layout_copy_bytes)))
    if plan.stream_buffers:
        rows.append((f"expert stream buffers ({plan.stream_buffers})", "GPU", human_size(plan.stream_bytes)))
    rows.append(("total", "GPU", f"{human_size(plan.device_bytes)} of {human_size(plan.budget)}"))
    rows.append(("total", "CPU memory", human_size(plan.host_bytes)))
    bw = plan.bandwidth
    rows.append((f"decode bound (GPU {bw.device:g}, PCIe {bw.pcie:g}, CPU {bw.cpu:g} GB/s)", "", _speed(plan)))
    return rows


def _slots_text(plan: Plan) -> str:
    counts = sorted({lp.slots for lp in plan.layers if lp.where == CACHE})
    parts = []
    if any(lp.where == DEVICE for lp in plan.layers):
        parts.append(f"{plan.num_experts} (resident)")
    if counts:
        parts.append(f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}")
    host = sum(1 for lp in plan.layers if lp.where == HOST)
    if host:
        parts.append(f"0 in {host} CPU layers")
    return ", ".join(parts)


def summary_rows(results: list[tuple[int, str, Plan | PlacementError]]) -> list[tuple[str, ...]]:
    """One row per (card GiB, scheme) from `placement.card_plans`, in SUMMARY_COLUMNS order."""
    rows = []
    for card, scheme, plan in results:
        if isinstance(plan, PlacementError):
            rows.append((f"{card} GiB", scheme, "does not fit", "", "", "", str(plan)))
            continue
        rows.append((
            f"{card} GiB", scheme, f"{100 * plan.experts_on_device_fraction:.0f}%", _slots_text(plan),
            human_size(plan.device_bytes), human_size(plan.host_bytes), _speed(plan),
        ))
    return rows
