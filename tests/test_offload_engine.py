"""The offload engine on a tiny model with "device" and "host" both on the CPU: the same greedy
tokens as the all-resident model for every cache size and miss policy, memory placed as planned,
prefill fetching each needed expert once, and stats that agree with the routing."""

import copy
import dataclasses

import pytest
import torch

from quant import get_scheme
from runtime.generate import Session
from runtime.model import build_model, init_random_weights
from runtime.offload import Costs, OffloadedExperts, QuantizedExpertCodec, apply_offload
from runtime.placement import CACHE, DEVICE, LayerPlacement, plan_placement
from runtime.quantized_model import quantize_model
from runtime.tiny_checkpoint import tiny_config

PROMPT = list(range(20, 44))  # 24 tokens, none of them the image token (9)
NEW_TOKENS = 10
BIG = 10**12  # a budget that never binds; slot counts come from expert_slots


@pytest.fixture(scope="module")
def config():
    return tiny_config(num_hidden_layers=3)


@pytest.fixture(scope="module")
def base(config):
    return init_random_weights(build_model(config, device="cpu", dtype=torch.float32), seed=3)


def generate(model):
    session = Session(model, 64)
    tokens = list(session.generate(PROMPT, max_new_tokens=NEW_TOKENS))
    return tokens, session


def prompt_logits(model):
    return Session(model, 64).prefill(PROMPT)


@pytest.fixture(scope="module")
def reference(base):
    return generate(base)[0], prompt_logits(base)


def offloaded(base, config, **plan_options):
    engine_options = {k: plan_options.pop(k) for k in ("miss_policy", "prefetch", "costs", "decay") if k in plan_options}
    model = copy.deepcopy(base)
    plan = plan_placement(config, plan_options.pop("budget", BIG), context=64, dtype=torch.float32, **plan_options)
    engine = apply_offload(model, plan, "cpu", "cpu", **engine_options)
    return model, engine, plan


@pytest.mark.parametrize("policy", ["auto", "fetch", "cpu"])
def test_same_tokens_for_every_cache_size(base, config, reference, policy):
    tokens, logits = reference
    for slots in range(config.text.moe_num_experts + 1):
        model, engine, plan = offloaded(base, config, expert_slots=slots, miss_policy=policy)
        assert generate(model)[0] == tokens, f"{slots} slots, {policy}"
        torch.testing.assert_close(prompt_logits(model), logits, rtol=1e-5, atol=1e-5)
        if slots < config.text.moe_num_experts:
            assert len(engine.layers) == 3 and all(lp.slots == slots for lp in plan.layers)


@pytest.mark.parametrize("options", [{"cpu_moe": True}, {"n_cpu_moe": 1, "expert_slots": 2}, {"prefetch": False,
                                     "expert_slots": 3}])
def test_same_tokens_with_host_layers_and_without_prefetch(base, config, reference, options):
    model, engine, _ = offloaded(base, config, **options)
    assert generate(model)[0] == reference[0]
    host_layers = [layer for layer, e in engine.layers.items() if e.host_only]
    assert host_layers == ([0, 1, 2] if options.get("cpu_moe") else [0] if options.get("n_cpu_moe") else [])


def test_memory_is_placed_as_planned(base, config):
    # A budget with room for exactly 3 slots per layer beyond the fixed parts.
    probe = plan_placement(config, BIG, context=64, dtype=torch.float32, expert_slots=0)
    fixed = probe.dense_bytes + probe.kv_bytes + probe.workspace_bytes + probe.stream_bytes
    budget = fixed + 3 * 3 * probe.slot_bytes + probe.slot_bytes - 1
    model, engine, plan = offloaded(base, config, budget=budget)
    assert [lp.slots for lp in plan.layers] == [3, 3, 3]
    ledger = engine.ledger
    assert ledger.device["weights"] == plan.dense_bytes + plan.resident_expert_bytes
    assert ledger.device["expert slots"] == plan.slot_total_bytes == 9 * plan.slot_bytes
    assert ledger.device["stream buffers"] == plan.stream_bytes
    assert ledger.host["expert store"] == plan.host_bytes
    session = Session(model, 64)  # the KV cache the plan budgeted
    kv = sum(t.numel() * t.element_size() for t in session.cache.keys + session.cache.values)
    assert kv == plan.kv_bytes
    assert ledger.device_total + kv + plan.workspace_bytes <= budget
    # Expert weights in model parameters (on the device) are gone for offloaded layers.
    assert not any("experts.fc" in name for name, _ in model.named_parameters())


def routed_experts(model, prompt):
    """(layer, expert) pairs the all-resident model routes the prompt to, from router outputs."""
    pairs = set()
    hooks = []
    for index, layer in enumerate(model.language_model.model.layers):
        k = layer.mlp.top_k

        def hook(module, args, logits, index=index, k=k):
            for e in torch.topk(logits, k, dim=-1).indices.unique().tolist():
                pairs.add((index, e))

        hooks.append(layer.mlp.router.register_forward_hook(hook))
    Session(model, 64).prefill(prompt)
    for h in hooks:
        h.remove()
    return pairs


def test_prefill_fetches_each_needed_expert_once_per_layer(base, config):
    needed = routed_experts(base, PROMPT)
    model, engine, _ = offloaded(base, config, expert_slots=0, miss_policy="fetch")
    Session(model, 64).prefill(PROMPT)
    prefill = engine.stats.prefill
    assert prefill.tokens == len(PROMPT)
    assert prefill.misses == prefill.fetched == prefill.streamed == len(needed)
    assert prefill.hits == prefill.cpu_computed == 0
    row = engine.layers[0].store.layout.nbytes
    assert prefill.bytes_to_device == len(needed) * row


def test_auto_policy_fetches_for_prefill_and_computes_decode_on_the_cpu(base, config, reference):
    # Fake costs: a fetch costs as much as 10 tokens on the CPU.
    costs = Costs(fetch=1.0, device=(0.0, 0.0), host=(0.0, 0.1), activation=0.0)
    model, engine, _ = offloaded(base, config, expert_slots=2, miss_policy="auto", costs=costs, prefetch=False)
    assert generate(model)[0] == reference[0]
    prefill, decode = engine.stats.prefill, engine.stats.decode
    # Prefill: 24 tokens x top-2 over 8 experts; experts routed > 10 tokens are fetched.
    assert prefill.fetched > 0
    assert decode.fetched == 0 and decode.cpu_computed == decode.misses > 0
    # Decode uses = tokens x layers x top-k; hits + misses account for every one.
    assert decode.tokens == NEW_TOKENS - 1
    assert decode.hits + decode.misses == decode.tokens * 3 * config.text.moe_topk
    # CPU-served decode misses admitted to the cache were copied over in the background.
    assert decode.promoted > 0
    stats = engine.stats.as_dict()
    assert stats["decode"]["cpu_computed_per_token"] == pytest.approx(decode.cpu_computed / decode.tokens)
    assert stats["decode"]["bytes_moved_per_token"] > 0


def _silence_layer_outputs(model):
    """Make layer 1's input equal layer 0's post-attention residual: zero layer 0's MoE output
    and layer 1's attention output. Then the next-layer guess is exact."""
    layers = model.language_model.model.layers
    with torch.no_grad():
        layers[0].mlp.experts.fc2.weight.zero_()
        layers[0].mlp.shared_experts.down_proj.weight.zero_()
        layers[1].self_attn.o_proj.weight.zero_()


def greedy_steps(model, target=None):
    """Greedy tokens after PROMPT, and the target layer's cache misses during decode alone."""
    session = Session(model, 64)
    logits = session.prefill(PROMPT)
    before = target.cache.misses if target is not None else 0
    tokens = []
    for _ in range(NEW_TOKENS):
        token = logits.argmax(-1)
        tokens.append(int(token))
        logits = session.decode(token)
    return tokens, (target.cache.misses - before if target is not None else 0)


@pytest.mark.parametrize("layer0", [DEVICE, CACHE])
def test_prefetch_guesses_the_next_layer(base, config, layer0):
    model = copy.deepcopy(base)
    _silence_layer_outputs(model)
    plan = plan_placement(config, BIG, context=64, dtype=torch.float32, expert_slots=2)
    layers = (LayerPlacement(0, layer0, 8 if layer0 == DEVICE else 2), LayerPlacement(1, CACHE, 2),
              LayerPlacement(2, DEVICE, 8))
    plan = dataclasses.replace(plan, layers=layers)
    reference = greedy_steps(copy.deepcopy(model))[0]
    # decay ~ 0: prefetch admission always wins, so a right guess always lands in a slot.
    engine = apply_offload(model, plan, "cpu", "cpu", miss_policy="cpu", decay=1e-9)
    target = engine.layers[1]
    tokens, decode_misses = greedy_steps(model, target)
    assert tokens == reference
    stats = engine.stats.total()
    assert engine.stats.decode.prefetched > 0 and stats.prefetch_used == stats.prefetched
    # Layer 1 has exactly top-k slots and the guess is exact: every expert it needed while
    # decoding had been copied in ahead of time.
    assert decode_misses == 0


def test_without_prefetch_the_same_layer_misses(base, config):
    model = copy.deepcopy(base)
    _silence_layer_outputs(model)
    plan = plan_placement(config, BIG, context=64, dtype=torch.float32, expert_slots=2)
    engine = apply_offload(model, plan, "cpu", "cpu", miss_policy="cpu", decay=1e-9, prefetch=False)
    assert greedy_steps(model, engine.layers[1])[1] > 0  # the test above is not vacuous


def _quantized(base, scheme):
    """The lead's quantized model (runtime.quantized_model), whose experts offer the codec hook."""
    model = copy.deepcopy(base)
    quantize_model(model, scheme, torch.float32)
    return model


@pytest.mark.parametrize("scheme", [get_scheme("int8"), get_scheme("int4", group_size=32)])
def test_quantized_experts_offload_like_the_resident_quantized_model(base, config, scheme):
    tokens = generate(_quantized(base, scheme))[0]
    for slots, policy in ((0, "fetch"), (0, "cpu"), (3, "fetch"), (3, "cpu"), (5, "auto")):
        model = _quantized(base, scheme)
        plan = plan_placement(config, BIG, context=64, scheme=scheme, dtype=torch.float32, expert_slots=slots)
        engine = apply_offload(model, plan, "cpu", "cpu", miss_policy=policy)
        assert generate(model)[0] == tokens, f"{scheme.name}, {slots} slots, {policy}"
        assert all(isinstance(layer.mlp.experts, OffloadedExperts) for layer in model.language_model.model.layers)
        assert engine.ledger.device.get("expert slots", 0) == 3 * slots * plan.slot_bytes


@pytest.mark.parametrize("rows", [5, 40])
def test_quantized_codec_computes_the_dequantized_expert(rows, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    fc1, fc2 = torch.randn(2, 64, 32, generator=gen) / 6, torch.randn(2, 32, 32, generator=gen) / 6  # [E, out, in]
    scheme = get_scheme("int8")
    # Host compute from the store's rows: 40 rows (a prefill) take the dequantize-and-GEMM path.
    gemm_calls = []
    gemm = type(scheme)._cpu_gemm
    monkeypatch.setattr(type(scheme), "_cpu_gemm", lambda self, x, p: gemm_calls.append(x.shape) or gemm(self, x, p))
    packed1, packed2 = scheme.quantize(fc1), scheme.quantize(fc2)
    codec = QuantizedExpertCodec(scheme, packed1, packed2, torch.float32)
    x = torch.randn(rows, 32, generator=gen)
    w1, w2 = scheme.dequantize(packed1)[1], scheme.dequantize(packed2)[1]
    gate, up = (x @ w1.T).chunk(2, dim=-1)
    expected = (torch.nn.functional.silu(gate) * up) @ w2.T
    torch.testing.assert_close(codec.compute(codec.payload(1, torch.device("cpu")), x), expected,
                               rtol=1e-4, atol=1e-4)
    assert len(gemm_calls) == (2 if rows >= scheme.cpu_gemm_min_rows else 0)


@pytest.mark.parametrize(("name", "shared"), [("int8", True), ("int4", False), ("nf4", False)])
def test_one_store_row_serves_device_and_host_only_where_the_layouts_match(name, shared):
    # No GPU here: the CUDA preparation of int8 has no CUDA-only step, so it runs on CPU tensors
    # and must give the CPU preparation's exact tensors; that is what lets the store skip its
    # second (host-layout) copy of every expert.
    scheme = get_scheme(name)
    packed = scheme.quantize(torch.randn(64, 256, generator=torch.Generator().manual_seed(1)))
    grouped = scheme.quantize(torch.randn(2, 64, 256))
    codec = QuantizedExpertCodec(scheme, grouped, grouped, torch.bfloat16)
    assert (codec.layout_key(torch.device("cuda")) == codec.layout_key(torch.device("cpu"))) == shared
    if shared:
        on_cpu, _ = scheme._prepare_cpu(packed, torch.bfloat16)
        for_cuda, _ = scheme._prepare_cuda(packed, torch.bfloat16)
        assert on_cpu.keys() == for_cuda.keys()
        assert all(torch.equal(on_cpu[k], for_cuda[k]) and on_cpu[k].dtype == for_cuda[k].dtype for k in on_cpu)


@pytest.mark.parametrize("store", ["int8 resident", "int4 resident", "float offloaded", "int8 offloaded",
                                   "int4 offloaded", "float offloaded after a resident layer"])
def test_compiled_decode_is_one_graph_whatever_experts_are_chosen(base, config, store):
    """Expert stores that read the expert ids on the host run inside the compiled step as one
    opaque op each (aria::host_dispatch). The step is one graph: no break around each layer's
    experts, and no recompile for a new expert set (a traced read would specialise the graph on
    the ids). The tokens are the eager ones."""
    from torch._dynamo.utils import counters

    name = store.split()[0]
    scheme = None if name == "float" else get_scheme(name, **({"group_size": 32} if name == "int4" else {}))
    model = _quantized(base, scheme) if scheme else copy.deepcopy(base)
    if "offloaded" in store:
        plan = plan_placement(config, BIG, context=64, scheme=scheme, dtype=torch.float32, expert_slots=3)
        if store.endswith("after a resident layer"):  # whose MoE block then guesses for the next
            plan = dataclasses.replace(plan, layers=(LayerPlacement(0, DEVICE, 0), *plan.layers[1:]))
        engine = apply_offload(model, plan, "cpu", "cpu", miss_policy="fetch")
        assert bool(engine.hooks) == store.endswith("after a resident layer")
    eager = generate(model)[0]
    torch._dynamo.reset()
    counters.clear()
    session = Session(model, 64, compile="eager")
    list(session.generate(PROMPT, max_new_tokens=3))
    graphs = counters["stats"]["unique_graphs"]
    session.reset()
    guessed = engine.stats.total().prefetched if "offloaded" in store else 0
    assert list(session.generate(PROMPT, max_new_tokens=NEW_TOKENS)) == eager
    assert graphs == counters["stats"]["unique_graphs"] == 1
    if "offloaded" in store:  # the next-layer guesses still run inside the graph
        assert engine.stats.total().prefetched > guessed
    assert not counters["graph_break"]


@pytest.mark.parametrize("plan_options", [{}, {"n_cpu_moe": 1, "expert_slots": 2}], ids=["resident", "offloaded"])
def test_a_staged_quantized_load_is_prepared_only_where_it_is_placed(tmp_path, config, plan_options):
    """Loaded for the offload engine to place (`staged`), quantized experts are not prepared for
    the CPU (every such layout would be thrown away); placing them prepares each for where it
    lands, and the answer is the resident model's."""
    from runtime.loader import load_model, load_model_with_report
    from runtime.tiny_checkpoint import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "model", config=config)
    expected = generate(load_model(path, torch.float32, quant="int8"))[0]
    staged, _ = load_model_with_report(path, torch.float32, quant="int8", staged=True)
    assert all(layer.mlp.experts.fc1 == [] for layer in staged.language_model.model.layers)
    with pytest.raises(RuntimeError, match="staged in host memory"):
        generate(staged)
    plan = plan_placement(config, BIG, context=64, scheme="int8", dtype=torch.float32, **plan_options)
    apply_offload(staged, plan, "cpu", "cpu", miss_policy="fetch")
    assert generate(staged)[0] == expected


def test_a_staged_bf16_load_keeps_the_checkpoint_layout(tmp_path, config):
    """bf16 experts are re-laid for the CPU's gemv only when they will compute on the CPU."""
    from runtime.loader import load_model, load_model_with_report
    from runtime.tiny_checkpoint import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "model", config=config, dtype=torch.bfloat16)
    resident = load_model(path, torch.bfloat16).language_model.model.layers[0].mlp.experts.fc1.weight
    staged, _ = load_model_with_report(path, torch.bfloat16, staged=True)
    fc1 = staged.language_model.model.layers[0].mlp.experts.fc1.weight
    assert resident.transpose(1, 2).is_contiguous() and fc1.is_contiguous()
    torch.testing.assert_close(fc1, resident, rtol=0, atol=0)


def test_a_copied_store_is_called_by_its_own_key(base):
    """A compiled step finds an expert store by key (runtime.host_calls): a deep copy (or an
    unpickled store) must get its own key, or a copy's graph would run the original's experts."""
    from runtime.host_calls import called

    original = _quantized(base, get_scheme("int8"))
    duplicate = copy.deepcopy(original)
    stores = [m.language_model.model.layers[0].mlp.experts for m in (original, duplicate)]
    assert stores[0].host_key != stores[1].host_key
    assert [called(s.host_key) for s in stores] == stores


def test_a_new_model_reuses_the_compiled_step(config):
    """The store's key reaches the op as a tensor, not an int baked into the graph: a second and
    third model (new stores, new keys) reuse the first one's compiled step, each with its own
    answer (the eager one)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for seed in range(3):
        model = _quantized(init_random_weights(build_model(config, device="cpu", dtype=torch.float32), seed=seed),
                           get_scheme("int8"))
        eager = generate(model)[0]
        session = Session(model, 64, compile="eager")
        assert list(session.generate(PROMPT, max_new_tokens=NEW_TOKENS)) == eager
    assert counters["stats"]["unique_graphs"] == 1
