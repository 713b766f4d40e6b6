"""The offload parts that need no model: cache eviction and admission, the miss policy with fake
costs, and the host store's one-row-per-expert packing."""

import random
from collections import OrderedDict

import pytest
import torch

from runtime.device import CopyStream
from runtime.offload import Costs, ExpertCache, FloatExpertCodec, HostStore, MissPolicy, PayloadLayout
from runtime.placement import SLOT_ALIGN


def test_eviction_takes_the_lowest_decayed_score():
    cache = ExpertCache(num_experts=6, slots=2, decay=0.5)
    for expert in (0, 1, 0):
        cache.record({expert: 1.0})
        if expert not in cache:
            assert cache.admit(expert, {expert}) is not None
    # Step 4 uses expert 2. Scores by hand: s0 = (1 * 0.5^2 + 1) * 0.5 = 0.625, s1 = 0.5^3 * 2 = 0.25.
    cache.record({2: 1.0})
    assert cache.score(0) == pytest.approx(0.625) and cache.score(1) == pytest.approx(0.25)
    assert cache.victim({2}) == 1
    slot, evicted = cache.admit(2, {2})
    assert evicted == 1 and cache.slot_of == {0: 0, 2: slot} and slot == 1
    assert (cache.hits, cache.misses) == (1, 3)


def test_a_one_off_expert_does_not_push_out_a_hot_one():
    cache = ExpertCache(num_experts=4, slots=1, decay=0.9)
    cache.record({0: 1.0})
    cache.admit(0, {0})
    cache.record({0: 1.0})
    cache.record({0: 1.0})  # s0 = 1 + 0.9 + 0.81 = 2.71
    # Expert 1 then keeps being used instead; by hand it wins the slot at its third use:
    # step 4: s1 = 1    vs s0 = 2.439   refused
    # step 5: s1 = 1.9  vs s0 = 2.195   refused
    # step 6: s1 = 2.71 vs s0 = 1.9755  admitted
    admitted_at = None
    for step in (4, 5, 6):
        cache.record({1: 1.0})
        if cache.admit(1, {1}) is not None:
            admitted_at = step
            break
    assert admitted_at == 6 and 0 not in cache


def test_forced_and_upcoming_admission():
    cache = ExpertCache(num_experts=4, slots=1, decay=0.9)
    for _ in range(3):
        cache.record({0: 1.0})
        if 0 not in cache:
            cache.admit(0, {0})
    cache.record({1: 1.0})
    assert cache.admit(1, {1}) is None  # 1 < 2.439: refused on score...
    assert cache.admit(1, {1}, force=True) == (0, 0)  # ...but a fetched miss is admitted anyway
    # A prefetch guess (not yet recorded) is compared as of the next step: a fresh guess
    # (0 * 0.9 + 1 = 1) beats an expert used once in the last step (1 * 0.9).
    cache = ExpertCache(num_experts=4, slots=1, decay=0.9)
    cache.record({2: 1.0})
    cache.admit(2, {2})
    assert cache.admit(3, {3}) is None
    assert cache.admit(3, {3}, upcoming=True) == (0, 2)


def _lru_reference(trace, slots):
    """Hits of a textbook LRU cache (always admit, evict the least recently used)."""
    cache, hits = OrderedDict(), 0
    for step in trace:
        for e in step:
            if e in cache:
                hits += 1
                cache.move_to_end(e)
        for e in step:
            if e not in cache:
                cache[e] = True
                cache.move_to_end(e)
        while len(cache) > slots:
            # Only evict experts not used in this step (they are still needed).
            victim = next(v for v in cache if v not in step)
            del cache[victim]
    return hits


def _replay(cache, trace, force=False):
    for step in trace:
        cache.record({e: 1.0 for e in step})
        for e in step:
            if e not in cache:
                cache.admit(e, set(step), force=force)
    return cache.hits


def test_tiny_decay_is_lru():
    # One expert per step: LRU has no order among experts used in the same step to compare.
    rng = random.Random(0)
    trace = [[rng.randrange(8)] for _ in range(400)]
    for slots in (2, 3, 5):
        assert _replay(ExpertCache(8, slots, decay=1e-6), trace) == _lru_reference(trace, slots)
        assert _replay(ExpertCache(8, slots, decay=1e-6), trace, force=True) == _lru_reference(trace, slots)


def test_no_decay_is_lfu():
    cache = ExpertCache(num_experts=4, slots=2, decay=1.0)
    for step in ([0], [0], [0], [1], [2]):
        cache.record({e: 1.0 for e in step})
        for e in step:
            if e not in cache:
                cache.admit(e, set(step))
    # 2 (count 1) cannot beat 1 (count 1): ties keep the resident. 0 (count 3) never leaves.
    assert set(cache.slot_of) == {0, 1}
    cache.record({2: 1.0})
    assert cache.admit(2, {2}) == (1, 1)  # count 2 > 1: the less frequent one goes


def test_protected_experts_and_fewer_slots_than_needed():
    cache = ExpertCache(num_experts=8, slots=2, decay=0.5)
    step = [3, 4, 5, 6]
    cache.record({e: 1.0 for e in step})
    admitted = [e for e in step if cache.admit(e, set(step)) is not None]
    assert admitted == [3, 4]  # the two free slots; the rest would evict an expert in use
    assert cache.victim(set(step)) is None
    assert ExpertCache(8, 0).admit(1) is None


def test_policy_picks_the_cheaper_way_as_costs_change():
    # fetch: 1.0 + 0.01 + 0.001 n;  cpu: 0.05 + (0.02 + 0.001) n;  equal at n = 48.
    costs = Costs(fetch=1.0, device=(0.01, 0.001), host=(0.05, 0.02), activation=0.001)
    policy = MissPolicy("auto", costs)
    assert [policy.serve(n) for n in (1, 47, 48, 49, 500)] == ["cpu", "cpu", "fetch", "fetch", "fetch"]
    fast_link = MissPolicy("auto", Costs(fetch=0.01, device=(0.01, 0.001), host=(0.05, 0.02), activation=0.001))
    assert fast_link.serve(1) == "fetch"
    slow_cpu = MissPolicy("auto", Costs(fetch=1.0, device=(0.01, 0.001), host=(2.0, 0.02), activation=0.001))
    assert slow_cpu.serve(1) == "fetch"
    assert MissPolicy("cpu").serve(10_000) == "cpu" and MissPolicy("fetch").serve(1) == "fetch"
    with pytest.raises(ValueError):
        MissPolicy("auto")


def test_host_store_packs_each_expert_into_one_row():
    gen = torch.Generator().manual_seed(0)
    fc1 = torch.randn(5, 12, 20, generator=gen)
    fc2 = torch.randn(5, 10, 12, generator=gen).to(torch.bfloat16)  # mixed dtypes on purpose
    codec = FloatExpertCodec(fc1, fc2)
    store = HostStore(codec, torch.device("cpu"), torch.device("cpu"), pin=False)
    layout = store.layout
    fc1_bytes = 12 * 20 * 4
    assert [offset for *_, offset in layout.entries] == [0, -(-fc1_bytes // SLOT_ALIGN) * SLOT_ALIGN]
    assert layout.nbytes % SLOT_ALIGN == 0 and store.rows.shape == (5, layout.nbytes)
    # One copy of one row carries the whole expert.
    slot = torch.zeros(layout.nbytes, dtype=torch.uint8)
    for e in range(5):
        CopyStream("cpu").copy(slot, store.row(e)).wait()
        views = layout.views(slot)
        assert torch.equal(views["fc1"], fc1[e]) and torch.equal(views["fc2"], fc2[e])
        assert views["fc2"].dtype == torch.bfloat16
        assert store.host_payload(e)["fc1"].data_ptr() == store.row(e).data_ptr()  # same layout: shared
    with pytest.raises(ValueError):
        PayloadLayout.of({"a": torch.zeros(3)}).pack({"b": torch.zeros(3)}, torch.zeros(SLOT_ALIGN, dtype=torch.uint8))


class DeviceLaidOutCodec(FloatExpertCodec):
    """Float experts whose CUDA payload has another layout than the host's (fc1 stored [out, in]),
    as int4's and nf4's kernels have: the store must keep what each side reads, and no more."""

    def payload(self, expert: int, device: torch.device) -> dict[str, torch.Tensor]:
        tensors = super().payload(expert, device)
        if torch.device(device).type == "cuda":
            return {"fc1_t": tensors["fc1"].T.contiguous(), "fc2": tensors["fc2"]}
        return tensors

    def layout_key(self, device: torch.device) -> str:
        return torch.device(device).type


@pytest.mark.parametrize(("fetch", "host_compute", "row_sets"), [(True, True, 2), (True, False, 1), (False, True, 1)])
def test_host_store_keeps_one_set_of_rows_per_layout_it_serves(fetch, host_compute, row_sets):
    """A cached layer whose misses may run on the host needs both layouts; a layer that only
    fetches needs the device's; a host-only layer (--cpu-moe) the host's alone."""
    gen = torch.Generator().manual_seed(0)
    fc1, fc2 = torch.randn(3, 8, 16, generator=gen), torch.randn(3, 8, 8, generator=gen)
    codec = DeviceLaidOutCodec(fc1, fc2)
    store = HostStore(codec, torch.device("cuda"), torch.device("cpu"), pin=False,
                      host_compute=host_compute, fetch=fetch)
    row_bytes = PayloadLayout.of(codec.payload(0, torch.device("cpu"))).nbytes
    assert store.nbytes == row_sets * 3 * row_bytes
    for e in range(3):
        if fetch:
            assert torch.equal(store.layout.views(store.row(e))["fc1_t"], fc1[e].T)
        else:
            with pytest.raises(ValueError, match="computes on the host only"):
                store.row(e)
        if host_compute:
            assert torch.equal(store.host_payload(e)["fc1"], fc1[e])
            assert torch.equal(store.host_payload(e)["fc2"], fc2[e])
    with pytest.raises(ValueError):
        HostStore(codec, torch.device("cuda"), torch.device("cpu"), pin=False, host_compute=False, fetch=False)


def test_pinned_stores_ask_for_exact_sizes_and_keep_the_users_allocator_settings(monkeypatch):
    """PyTorch pins a power of two per allocation unless told otherwise (1.5 GB of experts would
    pin 2 GB): the first pinned store sets the threshold, unless the user chose one. Setting
    replaces the whole configuration, so the user's other settings go along."""
    import subprocess
    import sys

    from runtime import device

    settings = {"now": ""}
    monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", lambda: settings["now"])
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", lambda s: settings.update(now=s))
    ours = f"pinned_max_round_threshold_mb:{device.EXACT_PINNED_ABOVE_MB}"
    device.pin_exact_sizes()
    assert settings["now"] == ours
    settings["now"] = "max_split_size_mb:512,garbage_collection_threshold:0.8"  # PYTORCH_ALLOC_CONF
    device.pin_exact_sizes()
    assert settings["now"] == f"max_split_size_mb:512,garbage_collection_threshold:0.8,{ours}"
    settings["now"] = "expandable_segments:True,pinned_max_round_threshold_mb:8"
    device.pin_exact_sizes()
    assert settings["now"] == "expandable_segments:True,pinned_max_round_threshold_mb:8"
    # PyTorch takes the combined string (in a process of its own: it is global state).
    accepted = (f"import torch; torch._C._accelerator_setAllocatorSettings('max_split_size_mb:512,{ours}'); "
                "print(torch._C._accelerator_getAllocatorSettings())")
    out = subprocess.run([sys.executable, "-c", accepted], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"max_split_size_mb:512,{ours}"
