"""The planner: exact byte counts against hand arithmetic from ARIA_SPEC §1.5 and against really
quantized tensors, budgets respected and used, clear errors, and the bandwidth bound by hand."""

import dataclasses
import json

import pytest
import torch

from quant import get_scheme
from runtime.config import AriaConfig
from runtime.errors import PlacementError, UsageError
from runtime.known_configs import aria_config_dict
from runtime.loader import expected_quantized_shapes
from runtime.model import build_model, init_random_weights
from runtime.placement import (
    CACHE,
    DEVICE,
    HOST,
    SEVERAL_GPUS,
    Bandwidths,
    card_plans,
    plan_placement,
)
from runtime.plan_table import PLAN_COLUMNS, SUMMARY_COLUMNS, plan_rows, summary_rows
from runtime.quant_targets import is_quantized, quantized_families
from runtime.quantized_model import quantize_model
from runtime.tiny_checkpoint import tiny_config
from runtime.weight_bytes import weight_bytes

GIB = 2**30

# ARIA_SPEC §1.5, by hand from the tensor shapes.
LAYERS, EXPERTS, H, I, SHARED_W = 28, 64, 2560, 1664, 3328
ATTENTION_PARAMS = LAYERS * 4 * H * H  # 734,003,200
EXPERT_PARAMS = H * 2 * I + I * H  # 12,779,520
ROUTED_PARAMS = LAYERS * EXPERTS * EXPERT_PARAMS  # 22,900,899,840
SHARED_PARAMS = LAYERS * 3 * H * SHARED_W  # 715,653,120
QUANTIZABLE = 24_350_556_160  # attention + routed + shared
OTHER = 956_752_752  # embeddings, lm_head, vision, projector, routers, norms
TOTAL_BF16 = 50_614_617_824
# int8 stores one float32 scale per output row of every quantized matrix.
ROWS_PER_LAYER = 4 * H + EXPERTS * (2 * I + H) + (SHARED_W + SHARED_W + H)


@pytest.fixture(scope="module")
def aria():
    return AriaConfig.from_dict(aria_config_dict())


def test_spec_arithmetic_is_self_consistent():
    assert ATTENTION_PARAMS + ROUTED_PARAMS + SHARED_PARAMS == QUANTIZABLE
    assert (QUANTIZABLE + OTHER) * 2 == TOTAL_BF16


def test_bf16_bytes_of_the_real_model(aria):
    b = weight_bytes(aria, None, torch.bfloat16)
    assert b.total == TOTAL_BF16
    assert b.routed == 2 * ROUTED_PARAMS
    assert b.expert == 2 * EXPERT_PARAMS
    assert b.dense == TOTAL_BF16 - 2 * ROUTED_PARAMS


@pytest.mark.parametrize(
    "name, quantized_bytes",
    [
        # int4 group 128: half a byte per weight + bf16 scale and zero per 128 weights.
        ("int4", QUANTIZABLE // 2 + QUANTIZABLE // 128 * 4),
        # int8 per channel: a byte per weight + a float32 scale per output row.
        ("int8", QUANTIZABLE + LAYERS * ROWS_PER_LAYER * 4),
        # nf4 blocks of 64: half a byte per weight + a float32 absmax per 64 weights.
        ("nf4", QUANTIZABLE // 2 + QUANTIZABLE // 64 * 4),
    ],
)
def test_quantized_bytes_of_the_real_model(aria, name, quantized_bytes):
    b = weight_bytes(aria, get_scheme(name), torch.bfloat16)
    assert b.total == quantized_bytes + 2 * OTHER
    f = b.families
    assert f["attention"] + f["routed experts"] + f["shared experts"] == quantized_bytes
    assert b.routed == b.expert * LAYERS * EXPERTS


def test_int4_numbers_match_the_design_table(aria):
    # DESIGN.md: int4 routed experts 12.2 GB, everything else 2.7 GB, whole model 14.9 GB.
    b = weight_bytes(aria, get_scheme("int4"), torch.bfloat16)
    assert round(b.routed / 1e9, 1) == 12.2
    assert round(b.dense / 1e9, 1) == 2.7
    assert abs(b.total / 1e9 - 14.9) < 0.06  # 14.85: the table rounds its two parts first


@pytest.mark.parametrize("name", ["int8", "int4", "nf4"])
def test_real_model_bytes_equal_the_quantized_checkpoint_the_loader_expects(aria, name):
    # The loader's strict list of (name, shape) in a quantized checkpoint, sized on the meta device.
    scheme = get_scheme(name)
    model = build_model(aria)
    total = 0
    for tensor_name, shape in expected_quantized_shapes(model, scheme).items():
        weight, _, suffix = tensor_name.rpartition(".")
        if weight.endswith("weight") and is_quantized(weight):
            dtype = scheme.packed_spec((32, 256))[suffix][1]  # packed dtypes do not depend on the shape
        else:
            dtype = torch.bfloat16
        total += torch.Size(shape).numel() * dtype.itemsize
    assert weight_bytes(aria, scheme, torch.bfloat16).total == total


@pytest.mark.parametrize("name", ["int8", "int4", "nf4"])
def test_tiny_model_bytes_equal_the_quantized_model(name):
    # Widths every scheme's kernels accept; the model is really quantized, tensors counted.
    config = tiny_config(hidden_size=128, moe_intermediate_size=128, vocab_size=256)
    model = init_random_weights(build_model(config, device="cpu"), seed=0)
    report = quantize_model(model, get_scheme(name), torch.float32)
    assert report.unquantized_experts() == 0
    assert weight_bytes(config, get_scheme(name), torch.float32).families == report.after
    # With the lm_head quantized too (--quant-lm-head): counted as the model holds it.
    with_head = quantized_families(lm_head=True)
    model = init_random_weights(build_model(config, device="cpu"), seed=0)
    report = quantize_model(model, get_scheme(name), torch.float32, families=with_head)
    counted = weight_bytes(config, get_scheme(name), torch.float32, with_head).families
    assert counted == report.after and counted["lm_head"] < weight_bytes(config, None, torch.float32).families["lm_head"] / 2


def test_a_scheme_that_cannot_take_the_shapes_is_refused():
    with pytest.raises(UsageError, match="choose another --scheme"):
        weight_bytes(tiny_config(hidden_size=64), get_scheme("int4"), torch.float32)


def test_kv_cache_is_280_kib_per_token(aria):
    plan = plan_placement(aria, 80 * GIB, context=8192)
    assert plan.kv_bytes == 286_720 * 8192


@pytest.mark.parametrize("card, scheme", [(c, s) for c in (16, 24, 48, 80) for s in ("bf16", "int8", "int4")])
def test_card_plans_stay_within_and_use_the_budget(aria, card, scheme):
    plan = plan_placement(aria, card * GIB, context=8192, scheme=scheme)
    assert plan.device_bytes <= plan.budget
    cached = [lp for lp in plan.layers if lp.where == CACHE]
    if cached:
        # Greedy fill: no room is left for one more slot.
        assert plan.budget - plan.device_bytes < plan.slot_bytes
        assert all(0 < lp.slots < EXPERTS for lp in cached)
        # Every expert has a host row; int4's CPU kernels want another layout, so the store
        # keeps a second row per expert for computing misses on the host (the default policy).
        copies = 2 if scheme == "int4" else 1
        assert plan.host_bytes == copies * LAYERS * EXPERTS * plan.expert_bytes
        if scheme == "int4":
            fetch_only = plan_placement(aria, card * GIB, context=8192, scheme=scheme, miss_policy="fetch")
            assert fetch_only.host_bytes == LAYERS * EXPERTS * plan.expert_bytes
    else:
        assert all(lp.where == DEVICE for lp in plan.layers)
        assert plan.host_bytes == 0


def test_the_promises_of_the_design(aria):
    def on_device(card, scheme):
        return plan_placement(aria, card * GIB, context=8192, scheme=scheme).experts_on_device_fraction

    assert on_device(24, "int4") == 1.0  # int4 fits a 24 GB card whole
    assert on_device(24, "int8") < 1.0  # int8 on 24 GB needs offloaded experts
    assert on_device(48, "bf16") < 1.0 < on_device(48, "int8") + 1e-9
    assert on_device(80, "bf16") == 1.0
    # More memory never means fewer experts on the device.
    for scheme in ("bf16", "int8", "int4"):
        fractions = [on_device(c, scheme) for c in (16, 24, 48, 80)]
        assert fractions == sorted(fractions)


def test_impossible_budget_says_what_would_fit(aria):
    with pytest.raises(PlacementError) as info:
        plan_placement(aria, 16 * GIB, context=65536, scheme="bf16")
    message = str(info.value)
    assert "\n" not in message and "needs at least" in message and "GB" in message
    suggested = int(message.split("--max-context ")[1].split()[0])
    plan = plan_placement(aria, 16 * GIB, context=suggested, scheme="bf16")
    assert plan.device_bytes <= 16 * GIB
    with pytest.raises(PlacementError):
        plan_placement(aria, 16 * GIB, context=suggested + 1024, scheme="bf16")


def test_a_budget_no_scheme_fits_points_to_several_gpus(aria):
    # 3 GiB holds the dense weights and a short cache at no scheme, whatever the context.
    for scheme in ("bf16", "int8", "int4"):
        with pytest.raises(PlacementError):
            plan_placement(aria, 3 * GIB, context=1024, scheme=scheme)
    with pytest.raises(PlacementError) as info:
        plan_placement(aria, 3 * GIB, scheme="int4")
    message = str(info.value)
    assert "\n" not in message and message.endswith("use a GPU with more memory, or " + SEVERAL_GPUS)
    assert "vllm serve rhymes-ai/Aria" in SEVERAL_GPUS


def fits(config, budget, scheme, **options) -> bool:
    try:
        plan_placement(config, budget, scheme=scheme, **options)
    except PlacementError:
        return False
    return True


def least_budget(config, scheme) -> int:
    """The least budget (to 1 MiB) that holds `config` at `scheme`, found by the planner itself."""
    low, high = 1, 64 * 1024
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(config, mid * 2**20, scheme) else (mid + 1, high)
    return low * 2**20


def test_a_smaller_scheme_is_suggested_exactly_where_it_fits(aria):
    least = least_budget(aria, "int4")
    assert not fits(aria, least, "bf16") and not fits(aria, least, "int8")
    with pytest.raises(PlacementError, match="try --quant int4$"):
        plan_placement(aria, least, scheme="bf16")
    with pytest.raises(PlacementError) as below:
        plan_placement(aria, least - 2**20, scheme="bf16")
    assert "try --quant int4" not in str(below.value) or "try --quant int4 --max-context" in str(below.value)


def test_only_a_shorter_context_at_a_smaller_scheme_is_named_with_both(aria):
    with pytest.raises(PlacementError) as info:
        plan_placement(aria, 5 * GIB, scheme="bf16")
    scheme, context = str(info.value).split("try --quant ")[1].split(" --max-context ")
    assert fits(aria, 5 * GIB, scheme, context=int(context))
    assert not fits(aria, 5 * GIB, scheme, context=int(context) + 1024)


def test_a_quantized_checkpoint_is_never_told_to_change_its_scheme(aria):
    stored = dataclasses.replace(aria, quantization={"scheme": "int8"})
    budget = least_budget(stored, "int8") - 2**20  # int8, the checkpoint's own scheme, just does not fit...
    assert fits(aria, budget, "int4")  # ...where int4 would
    with pytest.raises(PlacementError) as info:
        plan_placement(stored, budget, scheme="int8")
    assert "--quant" not in str(info.value)
    with pytest.raises(PlacementError, match="try --quant int4$"):  # a bf16 checkpoint is told
        plan_placement(aria, budget, scheme="int8")


def test_expert_slots_that_do_not_fit_name_the_most_that_do(aria):
    with pytest.raises(PlacementError) as info:
        plan_placement(aria, 16 * GIB, context=8192, scheme="int4", expert_slots=64)
    message = str(info.value)
    assert "--expert-slots 64" in message and "--cpu-moe" in message
    most = int(message.split("at most ")[1].split()[0])
    plan = plan_placement(aria, 16 * GIB, context=8192, scheme="int4", expert_slots=most)
    assert {lp.slots for lp in plan.layers} == {most} and plan.device_bytes <= 16 * GIB
    with pytest.raises(PlacementError):
        plan_placement(aria, 16 * GIB, context=8192, scheme="int4", expert_slots=most + 1)


def test_cpu_moe_and_n_cpu_moe(aria):
    plan = plan_placement(aria, 24 * GIB, scheme="int4", cpu_moe=True)
    assert all(lp.where == HOST and lp.slots == 0 for lp in plan.layers)
    assert plan.stream_buffers == 0 and plan.experts_on_device_fraction == 0
    # Host layers keep int4's CPU layout only (nothing of them is copied to the device): one row
    # per expert, where a cached layer whose misses may run on the CPU keeps two.
    assert plan.host_layout_copy_bytes == 0
    assert plan.host_bytes == LAYERS * EXPERTS * plan.expert_bytes
    plan = plan_placement(aria, 24 * GIB, scheme="int4", n_cpu_moe=5)
    assert [lp.where for lp in plan.layers] == [HOST] * 5 + [DEVICE] * 23
    assert plan.host_bytes == 5 * EXPERTS * plan.expert_bytes
    with pytest.raises(UsageError):
        plan_placement(aria, 24 * GIB, n_cpu_moe=29)
    with pytest.raises(UsageError):
        plan_placement(aria, 24 * GIB, expert_slots=65)


def test_decode_bound_by_hand(aria):
    bw = Bandwidths(device=1000.0, pcie=20.0, cpu=40.0)
    plan = plan_placement(aria, 24 * GIB, context=8192, scheme="int4", bandwidth=bw)
    assert plan.experts_on_device_fraction == 1.0
    # Per token: attention, shared and 6 routed experts at 0.53125 B/param; routers, norms,
    # lm_head and one embedding row in bf16 (ARIA_SPEC §1.5 active parameters).
    quantized = LAYERS * (4 * H * H + 6 * EXPERT_PARAMS + 3 * H * SHARED_W)
    float_params = LAYERS * (EXPERTS * H + 2 * H) + H + 100352 * H + H
    active = quantized * 0.53125 + float_params * 2
    assert plan.decode_tokens_per_second(0) == pytest.approx(1000e9 / active, rel=1e-9)
    full = active + 286_720 * 8192
    assert plan.decode_tokens_per_second(8192) == pytest.approx(1000e9 / full, rel=1e-9)
    # All experts on the CPU: the same device reads minus the experts, plus 168 CPU passes.
    host = plan_placement(aria, 24 * GIB, context=8192, scheme="int4", bandwidth=bw, cpu_moe=True)
    expert = EXPERT_PARAMS * 0.53125
    seconds = (active - LAYERS * 6 * expert) / 1000e9 + LAYERS * 6 * expert / 40e9
    assert host.decode_tokens_per_second(0) == pytest.approx(1 / seconds, rel=1e-9)


def test_rows_and_json(aria):
    plan = plan_placement(aria, 24 * GIB, context=8192, scheme="int8", n_cpu_moe=2)
    rows = plan_rows(plan)
    assert all(len(r) == len(PLAN_COLUMNS) and all(isinstance(c, str) for c in r) for r in rows)
    text = " ".join(" ".join(r) for r in rows)
    assert "layers 0-1" in text and "computed on the CPU" in text and "cached in slots" in text
    data = json.loads(json.dumps(plan.to_dict()))
    assert len(data["layers"]) == LAYERS and data["device_bytes"] <= data["budget_bytes"]
    table = summary_rows(card_plans(aria, cards_gib=(8, 24), context=32768))
    assert len(table) == 6 and all(len(r) == len(SUMMARY_COLUMNS) for r in table)
    assert any(r[2] == "does not fit" for r in table)


def test_sizes_print_in_the_unit_that_shows_them():
    from runtime.sizes import human_size

    assert human_size(14.9e9) == "14.9 GB" and human_size(0.6e9) == "0.6 GB" and human_size(0) == "0.0 GB"
    assert human_size(6_600_000) == "6.6 MB" and human_size(2048) == "2.0 kB"


def test_schemes_whose_cuda_product_dequantizes_reserve_their_largest_matrix(aria):
    """int8 on CUDA (and nf4 past one row) dequantizes a whole weight into bf16 before its GEMM:
    the workspace holds the largest quantized matrix, the lm_head when it is quantized too."""
    t = aria.text
    fc1 = 2 * t.moe_intermediate_size * t.hidden_size  # the largest of the default families
    assert weight_bytes(aria, get_scheme("int8"), torch.bfloat16).dequant_scratch == fc1 * 2
    assert weight_bytes(aria, get_scheme("nf4"), torch.bfloat16).dequant_scratch == fc1 * 2
    with_head = quantized_families(lm_head=True)
    assert weight_bytes(aria, get_scheme("int8"), torch.bfloat16, with_head).dequant_scratch == (
        t.vocab_size * t.hidden_size * 2)
    assert weight_bytes(aria, get_scheme("int4"), torch.bfloat16).dequant_scratch == 0
    assert weight_bytes(aria, None, torch.bfloat16).dequant_scratch == 0
    int8 = plan_placement(aria, 80 * GIB, context=8192, scheme="int8")
    int4 = plan_placement(aria, 80 * GIB, context=8192, scheme="int4")
    assert int8.workspace_bytes - int4.workspace_bytes == fc1 * 2


def test_compiled_decode_reserves_its_graphs_only_when_every_expert_is_resident(aria):
    """Graphs keep their own memory pool, where a step copies each layer's k chosen experts out
    (two layers' worth may be alive): counted apart from the workspace, and only where the plan
    keeps every expert resident (offloaded experts get no graphs) and has room for it."""
    eager = plan_placement(aria, 24 * GIB, scheme="int4")
    compiled = plan_placement(aria, 24 * GIB, scheme="int4", compiled=True)
    assert all(lp.where == DEVICE for lp in eager.layers + compiled.layers)
    assert eager.graph_bytes == 0
    assert compiled.graph_bytes == 2 * aria.text.moe_topk * eager.expert_bytes
    assert compiled.device_bytes == eager.device_bytes + compiled.graph_bytes
    assert "compiled decode's CUDA graphs" in " ".join(row[0] for row in plan_rows(compiled))
    # No room for the graphs: every expert stays resident and decode compiles without graphs
    # (offloading experts that fit would cost far more than the graphs save).
    squeezed = plan_placement(aria, eager.device_bytes, scheme="int4", compiled=True)
    assert squeezed.graph_bytes == 0 and all(lp.where == DEVICE for lp in squeezed.layers)
    assert squeezed.device_bytes == eager.device_bytes
    offloaded = plan_placement(aria, 24 * GIB, scheme="int8", compiled=True)
    assert offloaded.graph_bytes == 0 and any(lp.where == CACHE for lp in offloaded.layers)
