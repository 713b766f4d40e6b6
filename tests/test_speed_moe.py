"""The fast MoE dispatches against a hand loop over every (token, choice) pair (ARIA_SPEC §2.5).

Every dispatch must give the same routed sum: routed_sum (host counts, any expert store),
grouped_routed_sum (device-side group offsets + F.grouped_mm), one_token_routed_sum (decode on
the CPU) and gathered_routed_sum (decode choosing on the device, for CUDA graphs). The reference
here is the formula itself, written as plainly as possible.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.moe import (
    float_routed_sum,
    gathered_routed_sum,
    grouped_routed_sum,
    one_token_routed_sum,
    routed_sum,
    weighted_rows,
)

E, H, INTER, K = 6, 16, 8, 2


def weights(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    fc1 = (torch.randn(E, H, 2 * INTER, generator=gen) / H**0.5).to(dtype)
    fc2 = (torch.randn(E, INTER, H, generator=gen) / INTER**0.5).to(dtype)
    return fc1, fc2


def routing(n, seed=0, experts=None):
    """Random distinct top-k ids per token (from `experts` only, to leave some experts empty)."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts if experts is not None else range(E))
    idx = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:K]] for _ in range(n)])
    w = torch.softmax(torch.randn(n, K, generator=gen), dim=-1)
    return idx, w


def by_hand(x, idx, w, fc1, fc2, only=None):
    """sum over choices j of w[t, j] * fc2[e]^T silu(gate) * up, in float64, token by token."""
    x, fc1, fc2, w = x.double(), fc1.double(), fc2.double(), w.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if only is not None and e not in only:
                continue
            h = x[t] @ fc1[e]
            gate, up = h[:INTER], h[INTER:]  # the first half is the gate (SiLU), the second the up projection
            out[t] += w[t, j] * ((gate * torch.sigmoid(gate) * up) @ fc2[e])
    return out


def expert_fn(fc1, fc2):
    return lambda e, xe: F.silu(xe @ fc1[e][:, :INTER]) * (xe @ fc1[e][:, INTER:]) @ fc2[e]


@pytest.mark.parametrize("n", [1, 3, 37])
@pytest.mark.parametrize("experts", [None, [0, 2, 5]], ids=["all-experts", "some-experts-empty"])
def test_every_dispatch_equals_the_hand_loop(n, experts):
    fc1, fc2 = weights()
    x = torch.randn(n, H, generator=torch.Generator().manual_seed(n))
    idx, w = routing(n, seed=n, experts=experts)
    expected = by_hand(x, idx, w, fc1, fc2).float()
    torch.testing.assert_close(routed_sum(x, idx, w, E, expert_fn(fc1, fc2)), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped_routed_sum(x, idx, w, fc1, fc2), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(float_routed_sum(x, idx, w, fc1, fc2), expected, atol=1e-5, rtol=1e-5)
    if n == 1:
        one = one_token_routed_sum(x, idx[0].tolist(), w, lambda e, xe: xe @ fc1[e], lambda e, a: a @ fc2[e])
        torch.testing.assert_close(one, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gathered_routed_sum(x, idx, w, fc1, fc2), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 9])
def test_routed_sum_with_an_expert_order_sums_only_those_experts(n):
    """The offload engine splits one layer's experts over several calls whose parts must add up."""
    fc1, fc2 = weights()
    x = torch.randn(n, H, generator=torch.Generator().manual_seed(1))
    idx, w = routing(n, seed=1)
    run = expert_fn(fc1, fc2)
    first, second = [4, 1, 2], [0, 3, 5]
    if n == 1:  # each part holds one of the token's two experts (plus, in the first, an unused one)
        unused = next(e for e in range(E) if e not in idx[0].tolist())
        first, second = [int(idx[0, 1]), unused], [int(idx[0, 0])]
    part1 = routed_sum(x, idx, w, E, run, expert_order=first)
    part2 = routed_sum(x, idx, w, E, run, expert_order=second)
    torch.testing.assert_close(part1, by_hand(x, idx, w, fc1, fc2, only=first).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part1 + part2, by_hand(x, idx, w, fc1, fc2).float(), atol=1e-5, rtol=1e-5)


def test_tied_router_logits_and_one_expert_for_every_token():
    """Every token on the same experts: one group holds all rows, the other groups are empty."""
    fc1, fc2 = weights()
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(2))
    idx = torch.tensor([[3, 1]] * 5)
    w = torch.full((5, K), 0.5)
    expected = by_hand(x, idx, w, fc1, fc2).float()
    torch.testing.assert_close(grouped_routed_sum(x, idx, w, fc1, fc2), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(routed_sum(x, idx, w, E, expert_fn(fc1, fc2)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 12])
def test_bfloat16_dispatch_is_close_to_the_exact_sum(n):
    fc1, fc2 = weights(torch.bfloat16)
    x = torch.randn(n, H, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    idx, w = routing(n, seed=3)
    w = w.to(torch.bfloat16)
    expected = by_hand(x, idx, w, fc1, fc2).float()
    got = float_routed_sum(x, idx, w, fc1, fc2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=3e-2)


def test_grouped_dispatch_traces_into_one_graph_without_host_sync():
    """fullgraph tracing fails on .item()/.tolist()/data-dependent shapes: the GPU path has none.

    F.grouped_mm traces for bfloat16 (what it runs in on CUDA); the 'eager' backend only traces.
    """
    fc1, fc2 = weights(torch.bfloat16)
    x = torch.randn(7, H, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    idx, w = routing(7, seed=4)
    w = w.to(torch.bfloat16)
    traced = torch.compile(grouped_routed_sum, fullgraph=True, backend="eager", dynamic=False)
    torch.testing.assert_close(traced(x, idx, w, fc1, fc2), grouped_routed_sum(x, idx, w, fc1, fc2), atol=0, rtol=0)


def test_gathered_dispatch_traces_into_one_graph_and_compiles_once_for_any_experts():
    """The ids stay on the device: one graph, and new expert choices reuse it (no specialising)."""
    from torch._dynamo.utils import counters

    fc1, fc2 = weights()
    torch._dynamo.reset()
    counters.clear()
    traced = torch.compile(gathered_routed_sum, fullgraph=True, backend="eager", dynamic=False)
    for seed in range(4):
        x = torch.randn(1, H, generator=torch.Generator().manual_seed(seed))
        idx, w = routing(1, seed=seed)
        torch.testing.assert_close(traced(x, idx, w, fc1, fc2), by_hand(x, idx, w, fc1, fc2).float(),
                                   atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_tokens_expert_outputs_are_summed_with_one_rounding(dtype):
    """weighted_rows computes bf16 in float32 (PyTorch's bf16 product of this shape is slow on the
    CPU): the result is the exact weighted sum rounded once to the rows' dtype."""
    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(6, 1024, generator=gen).to(dtype)
    w = torch.softmax(torch.randn(1, 6, generator=gen), dim=-1).to(dtype)
    got = weighted_rows(w, rows)
    exact = w.double() @ rows.double()
    assert got.dtype == dtype and got.shape == (1, 1024)
    torch.testing.assert_close(got.double(), exact.to(dtype).double(), atol=1e-6, rtol=2**-8)


def test_gpus_without_a_sync_free_grouped_gemm_take_the_host_read_dispatch():
    """F.grouped_mm copies its group offsets to the host on every GPU but SM90/SM100 (PyTorch's
    GroupedBlas.cpp falls back to a loop there), so neither decode pipelining nor a CUDA graph
    could rely on it: the consumer and Ampere cards most users have read the counts once instead."""
    from runtime.moe import grouped_mm_supported, has_grouped_mm_kernel

    assert [has_grouped_mm_kernel(c) for c in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]] == [
        False, False, False, True, True, False]
    assert grouped_mm_supported(torch.zeros(1, 4))  # the CPU is its own host
