"""A decode step that a CUDA graph can hold, checked on the CPU through the same code.

`prepare_for_cuda_graphs` is what compiled decode runs on a GPU before capturing graphs. Here:
- every resident expert store (float, int8, int4, nf4) switches to choosing its experts on the
  device; the step then traces into one graph (fullgraph refuses any host read), is traced once
  whatever experts later tokens choose, and gives the logits of the step that reads the ids on the host;
- every tensor the graph reads, except the token and its position, is at a fixed address (a
  graph replays on fixed addresses and would copy anything else in on every replay);
- a model with offloaded experts cannot: it is left as it was and gets no graphs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters, get_static_address_type

from quant import get_scheme
from runtime.generate import Session, decode_logits, prepare_for_cuda_graphs
from runtime.model import build_model, init_random_weights
from runtime.offload import apply_offload
from runtime.placement import plan_placement
from runtime.quantized_model import quantize_model
from runtime.tiny_checkpoint import tiny_config

# Widths every scheme's kernels accept; 4 experts of 8 so that tokens choose different ones.
CONFIG = tiny_config(hidden_size=128, moe_intermediate_size=128, vocab_size=256, num_hidden_layers=2)
STORES = ["float", "int8", "int4", "nf4"]
PROMPT = torch.randint(10, 256, (1, 12), generator=torch.Generator().manual_seed(0))
TOKENS = [17, 203, 64, 99, 5]


@pytest.fixture(scope="module")
def base():
    return init_random_weights(build_model(CONFIG, device="cpu"), seed=3)


def with_store(base, store: str, dtype=torch.float32):
    model = copy.deepcopy(base).to(dtype)
    if store != "float":
        quantize_model(model, get_scheme(store), dtype)
    return model


def prefilled(model):
    cache = model.new_cache(32)
    with torch.inference_mode():
        model(PROMPT, cache, 0)
    return cache


def static_steps(model, cache, step=decode_logits):
    """Logits of TOKENS fed one by one after the prompt, positions on the device (the graph's form)."""
    with torch.inference_mode():
        return [step(model, torch.tensor([[t]]), cache, torch.tensor([PROMPT.shape[1] + i]))
                for i, t in enumerate(TOKENS)]


@pytest.mark.parametrize("store", STORES)
def test_a_graph_ready_step_is_one_graph_for_any_experts_and_gives_the_host_read_logits(base, store):
    model = with_store(base, store)
    chosen = []  # each step's expert choice in each layer, seen by the host-read steps
    hooks = [layer.mlp.router.register_forward_hook(
        lambda module, args, logits: chosen.append(tuple(logits.topk(CONFIG.text.moe_topk).indices[0].tolist())))
        for layer in model.language_model.model.layers]
    expected = static_steps(model, prefilled(model))
    for hook in hooks:
        hook.remove()
    assert len(set(chosen[-len(TOKENS) * CONFIG.text.num_hidden_layers:])) > 1  # one graph serves several choices
    cache = prefilled(model)
    assert prepare_for_cuda_graphs(model, cache)
    torch._dynamo.reset()
    counters.clear()
    traced = torch.compile(decode_logits, fullgraph=True, dynamic=False, backend="eager")
    got = static_steps(model, cache, traced)
    assert counters["stats"]["unique_graphs"] == 1
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("store", ["int4", "nf4"])
def test_gathered_bfloat16_kernel_layouts_give_the_host_read_logits(base, store):
    """bf16 prepares other CPU layouts (int4's bf16 scales, nf4's fused-kernel tiles)."""
    model = with_store(base, store, torch.bfloat16)
    expected = static_steps(model, prefilled(model))
    cache = prefilled(model)
    assert prepare_for_cuda_graphs(model, cache)
    traced = torch.compile(decode_logits, fullgraph=True, dynamic=False, backend="eager")
    for g, e in zip(static_steps(model, cache, traced), expected, strict=True):
        torch.testing.assert_close(g, e, atol=0, rtol=0)


@pytest.mark.parametrize("store", STORES)
def test_a_graph_ready_step_reads_nothing_but_the_token_and_position_from_moving_addresses(base, store):
    """What inductor's CUDA graph code is handed: the inputs it may assume fixed (the rest it
    copies in before every replay) and the inputs the step writes (only fixed ones may be)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._guards import TracingContext

    model = with_store(base, store)
    cache = prefilled(model)
    assert prepare_for_cuda_graphs(model, cache)
    seen = {}

    def inspect(graph, inputs):
        meta = TracingContext.try_get().fw_metadata
        seen["inputs"], seen["static"] = inputs, set(meta.static_input_indices)
        seen["mutated"] = {i for i, info in enumerate(meta.input_info) if info.mutates_data}
        seen["code"] = str(graph.graph)
        return graph

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=inspect, keep_inference_input_mutations=True)
    static_steps(model, cache, torch.compile(decode_logits, fullgraph=True, dynamic=False, backend=backend))
    inputs, static = seen["inputs"], seen["static"]
    moving = [tuple(t.shape) for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and i not in static]
    assert sorted(moving) == [(1,), (1, 1)]  # the position and the token
    assert len(static) > 2 * CONFIG.text.num_hidden_layers  # weights and the cache
    assert seen["mutated"] and seen["mutated"] <= static  # the cache, written in place
    # The experts are in the graph itself, not behind the opaque op that reads the host on a GPU.
    assert "float_routed_sum" not in seen["code"] and "index_select" in seen["code"]


def test_compiled_generation_with_graph_ready_experts_gives_the_eager_tokens(base):
    model = with_store(base, "int8")
    ids = PROMPT[0].tolist()
    expected = list(Session(model, 40).generate(ids, max_new_tokens=10))
    session = Session(model, 40, compile="aot_eager")
    assert prepare_for_cuda_graphs(model, session.cache)
    assert list(session.generate(ids, max_new_tokens=10)) == expected


def test_offloaded_experts_leave_the_model_as_it_was(base):
    model = with_store(base, "int8")
    plan = plan_placement(CONFIG, 1 << 40, context=32, scheme=get_scheme("int8"), dtype=torch.float32,
                          expert_slots=3)
    apply_offload(model, plan, "cpu", "cpu", miss_policy="fetch")
    cache = prefilled(model)
    assert not prepare_for_cuda_graphs(model, cache)
    assert all(get_static_address_type(t) is None for t in cache.keys + cache.values)
    assert not any(getattr(m, "gathers", False) for m in model.modules())
