"""Aria's mixture-of-experts block (ARIA_SPEC §2.5).

router top-k on the raw logits -> softmax over the k selected logits (fp32, as the original)
-> SwiGLU experts (first half of fc1 is the gate) -> weighted sum -> plus the always-on shared MLP.

Routed expert weights are stored grouped as the checkpoints have them, [experts, in, out], so a
loaded tensor is the mmap'd checkpoint tensor itself (no transpose, no copy; bf16 on the CPU is
re-laid for gemv, see decode_kernels). Experts run one matmul per used expert over the tokens
routed to it (tokens sorted by expert), which serves both decode and prefill. `routed_sum` is
that dispatch, shared by every expert store (float, quantized, offloaded): each only says how to
run one expert on some tokens, and the per-expert token counts come to the host once per layer
so the store can decide per expert; one token (decode) skips the sort and runs its k experts.
Float experts dispatch in `float_routed_sum`:
- one token on the CPU: its k experts straight from the ids (a host read is free there), all k
  gate/up products through one SwiGLU (`one_token_routed_sum`; quantized experts do the same);
- elsewhere `grouped_routed_sum`: the same sort with the group boundaries kept on the device and
  one F.grouped_mm per projection, so no step waits for the host (GPU decode and any prefill);
- where F.grouped_mm would wait for the host anyway (CUDA without PyTorch's grouped kernel:
  anything but bf16 on SM90/SM100): routed_sum, which reads the counts once per layer; or, once
  `gather_experts_on_device` has switched the model over for a CUDA graph, compiled one-token
  steps copy their k experts' weights out by device index (`gathered_routed_sum`; quantized
  experts too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig
from .decode_kernels import linear, row_matmul
from .host_calls import HostCalled, called


class GroupedWeight(nn.Module):
    """Holds one [experts, in, out] tensor under the checkpoint name `<...>.weight`."""

    def __init__(self, experts: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, d_in, d_out), requires_grad=False)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[.., 2I] -> [.., I]: SiLU(first half, the gate) * second half (the up projection)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_expert(x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
    """One routed expert on float weights: x [N, H] @ fc1 [H, 2I] -> SwiGLU -> @ fc2 [I, H]."""
    return swiglu(x @ fc1) @ fc2


def _same_dtype(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # A no-op .to() still costs a dispatch; decode steps are made of such small costs.
    return t if t.dtype == like.dtype else t.to(like.dtype)


def weighted_rows(weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """weights [1, k] @ rows [k, H] -> [1, H] in rows' dtype: one token's k expert outputs, summed.

    In float32 on the CPU: PyTorch's bf16 product of this shape costs ~15x the float32 one (25 us
    against 1.5 us at H=1024), more than the two casts; the sum also rounds once.
    """
    if rows.dtype == torch.float32 or rows.device.type != "cpu":
        return _same_dtype(weights, rows) @ rows
    return (weights.float() @ rows.float()).to(rows.dtype)


def _combine(ys: torch.Tensor, order: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
    """Expert outputs in sorted order [N*k, H] -> sum_k w_k * y_k per token [N, H].

    One gather back to (token, choice) order and one batched [1, k] @ [k, H] per token: far
    cheaper on CPU than index_add_ per expert, and free of host synchronisation.
    """
    n, k = top_w.shape
    y = torch.empty_like(ys)
    y[order] = ys
    y = y.view(n, k, ys.shape[-1])
    return torch.bmm(top_w.unsqueeze(1).to(y.dtype), y).squeeze(1)


def routed_sum(
    x: torch.Tensor,
    top_idx: torch.Tensor,
    top_w: torch.Tensor,
    num_experts: int,
    run_expert: Callable[[int, torch.Tensor], torch.Tensor],
    expert_order: Iterable[int] | None = None,
) -> torch.Tensor:
    """sum_k w_k * expert_{idx_k}(x) for x [N, H], top_idx/top_w [N, k] -> [N, H].

    Tokens are sorted by expert so each used expert runs once over all its tokens.
    `expert_order` lets an offloaded store run resident experts first while misses arrive;
    experts it leaves out contribute nothing (their share is summed by another call).
    The per-expert token counts go to the host once: the caller's store decides per expert.
    """
    if x.shape[0] == 1:
        return _one_token_routed_sum(x, top_idx, top_w, run_expert, expert_order)
    k = top_idx.shape[1]
    flat = top_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    ends = torch.bincount(flat, minlength=num_experts).cumsum(0).tolist()
    xs = x[order // k]  # tokens in expert order: each expert's rows are one contiguous slice
    ys = torch.zeros_like(xs)
    for expert in expert_order if expert_order is not None else range(num_experts):
        begin = ends[expert - 1] if expert else 0
        if begin == ends[expert]:
            continue
        ys[begin : ends[expert]] = run_expert(expert, xs[begin : ends[expert]])
    return _combine(ys, order, top_w)


def _one_token_routed_sum(x, top_idx, top_w, run_expert, expert_order) -> torch.Tensor:
    """routed_sum for one token (decode): its k experts straight from the ids, no sort, no scatter."""
    chosen = top_idx[0].tolist()
    run = chosen if expert_order is None else [e for e in expert_order if e in chosen]
    if not run:
        return torch.zeros_like(x)
    ys = torch.cat([run_expert(e, x) for e in run])  # [len(run), H]
    weights = top_w if run == chosen else top_w[:, [chosen.index(e) for e in run]]
    return weighted_rows(weights, ys)


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Can F.grouped_mm run the experts for activations like `x` with no wait for the host?

    CPU: any float (the host is the device). CUDA: bf16 on a GPU with PyTorch's grouped kernel;
    elsewhere (A100, RTX 30/40, L4, ...) F.grouped_mm falls back to one matmul per group after
    copying the group offsets to the host, a sync per call, which no CUDA graph can hold.
    """
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    return (x.device.type == "cuda" and x.dtype == torch.bfloat16
            and has_grouped_mm_kernel(torch.cuda.get_device_capability(x.device)))


def has_grouped_mm_kernel(capability: tuple[int, int]) -> bool:
    """PyTorch's sync-free bf16 grouped GEMM is built for SM90 and SM100 only (GroupedBlas.cpp)."""
    return capability[0] in (9, 10)


def grouped_routed_sum(x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor, fc1: torch.Tensor,
                       fc2: torch.Tensor) -> torch.Tensor:
    """routed_sum for float grouped weights fc1 [E, H, 2I], fc2 [E, I, H] with no host synchronisation.

    Group boundaries stay on the device (searchsorted over the sorted expert ids), so decode
    and prefill take the same path, one grouped matmul per projection, and it traces into a
    static graph for compiled decode. Same value as routed_sum with swiglu_expert.
    """
    k = top_idx.shape[1]
    flat = top_idx.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    experts = torch.arange(fc1.shape[0], device=flat.device, dtype=flat.dtype)
    ends = torch.searchsorted(sorted_ids, experts, right=True).to(torch.int32)
    xs = x[order // k]
    ys = F.grouped_mm(swiglu(F.grouped_mm(xs, fc1, offs=ends)), fc2, offs=ends)
    return _combine(ys, order, top_w)


def one_token_routed_sum(x: torch.Tensor, slots: Sequence, top_w: torch.Tensor,
                          up: Callable[[object, torch.Tensor], torch.Tensor],
                          down: Callable[[object, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """routed_sum for a single token [1, H], its k experts named by `slots` in top_w's order.

    A slot is whatever `up(slot, x)` (that expert's fc1 product) and `down(slot, a)` (its fc2
    product) take: the expert ids read on the host where that costs nothing (the CPU), or 0..k-1
    into weights gathered on the device (gathered_routed_sum). Only the k chosen experts are
    touched (grouped_mm's CPU kernel visits all E groups), and the gate/up halves of all k run
    through one SwiGLU: a decode step is made of small ops, so fewer ops is faster.
    """
    act = swiglu(torch.cat([up(slot, x) for slot in slots]))  # [k, I]
    ys = torch.cat([down(slot, act[j : j + 1]) for j, slot in enumerate(slots)])  # [k, H]
    return weighted_rows(top_w, ys)


def gathered_routed_sum(x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor, fc1: torch.Tensor,
                        fc2: torch.Tensor) -> torch.Tensor:
    """one_token_routed_sum with the k experts' float weights copied out by device index.

    Nothing reads the ids on the host, so the step fits a CUDA graph where grouped_mm would
    wait for the host (see grouped_mm_supported); the copy costs one extra read and write of the
    active expert weights per step.
    """
    ids = top_idx[0]
    w1, w2 = fc1.index_select(0, ids), fc2.index_select(0, ids)
    return one_token_routed_sum(x, range(ids.shape[0]), top_w, lambda j, xe: xe @ w1[j], lambda j, a: a @ w2[j])


def float_routed_sum(x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor, fc1: torch.Tensor,
                     fc2: torch.Tensor) -> torch.Tensor:
    """The routed experts on float grouped weights: grouped matmuls where they run, else routed_sum."""
    if x.shape[0] == 1 and x.device.type == "cpu":
        return one_token_routed_sum(x, top_idx[0].tolist(), top_w, lambda e, xe: row_matmul(xe, fc1[e]),
                                    lambda e, a: row_matmul(a, fc2[e]))
    if grouped_mm_supported(x):
        return grouped_routed_sum(x, top_idx, top_w, fc1, fc2)
    return routed_sum(x, top_idx, top_w, fc1.shape[0], lambda e, xe: swiglu_expert(xe, fc1[e], fc2[e]))


# For torch.compile the dispatch is one opaque op: its row counts per expert are data, which a
# static graph cannot hold, and F.grouped_mm only traces for bf16. Eager calls skip the op layer.
@torch.library.custom_op("aria::float_routed_sum", mutates_args=())
def _float_routed_sum_op(x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor, fc1: torch.Tensor,
                         fc2: torch.Tensor) -> torch.Tensor:
    return float_routed_sum(x, top_idx, top_w, fc1, fc2)


@_float_routed_sum_op.register_fake
def _(x, top_idx, top_w, fc1, fc2):
    return torch.empty_like(x)


class RoutedExperts(nn.Module):
    """Float experts, grouped [experts, in, out] as stored in the checkpoints."""

    def __init__(self, config: TextConfig):
        super().__init__()
        h, i, e = config.hidden_size, config.moe_intermediate_size, config.moe_num_experts
        self.num_experts = e
        self.fc1 = GroupedWeight(e, h, 2 * i)  # columns [0, i) = gate, [i, 2i) = up
        self.fc2 = GroupedWeight(e, i, h)
        self.gathers = False  # see gather_on_device

    def gather_on_device(self) -> None:
        """From now on a compiled one-token step takes its experts' weights by device index
        (gathered_routed_sum) where grouped_mm would read the group sizes on the host."""
        self.gathers = True

    def can_gather_on_device(self) -> bool:
        return True

    def run_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return swiglu_expert(x, self.fc1.weight[expert], self.fc2.weight[expert])

    def forward(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        if gathering_now(self, x) and not (x.device.type != "cpu" and grouped_mm_supported(x)):
            return gathered_routed_sum(x, top_idx, top_w, self.fc1.weight, self.fc2.weight)
        if torch.compiler.is_compiling():
            return _float_routed_sum_op(x, top_idx, top_w, self.fc1.weight, self.fc2.weight)
        return float_routed_sum(x, top_idx, top_w, self.fc1.weight, self.fc2.weight)


class SharedExperts(nn.Module):
    """The two shared experts, fused into one SwiGLU MLP of width 2 x expert width."""

    def __init__(self, config: TextConfig):
        super().__init__()
        h, w = config.hidden_size, config.shared_intermediate_size
        self.gate_proj = nn.Linear(h, w, bias=False)
        self.up_proj = nn.Linear(h, w, bias=False)
        self.down_proj = nn.Linear(w, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.down_proj, F.silu(linear(self.gate_proj, x)) * linear(self.up_proj, x))


class MoEBlock(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.top_k = config.moe_topk
        self.router = nn.Linear(config.hidden_size, config.moe_num_experts, bias=False)
        self.experts = RoutedExperts(config)
        self.shared_experts = SharedExperts(config)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (expert ids [N, k], weights [N, k]) in x's dtype."""
        logits = linear(self.router, x)
        top_logits, top_idx = torch.topk(logits, self.top_k, dim=-1)
        return top_idx, _same_dtype(torch.softmax(top_logits, dim=-1, dtype=torch.float32), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        top_idx, top_w = self.route(flat)
        routed = self.experts(flat, top_idx, top_w)
        return (routed + self.shared_experts(flat)).reshape(shape)


class DispatchesOnHost(HostCalled, nn.Module):
    """An expert store whose dispatch reads the expert ids on the host (`dispatch_on_host`):
    quantized experts (their kernels are per expert) and offloaded ones (they decide per expert
    what to copy). Eagerly it is called as it is; in a compiled step it is one opaque op,
    aria::host_dispatch (runtime.host_calls says why)."""

    def __init__(self) -> None:
        super().__init__()
        self._register()

    def dispatch_on_host(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def host_dispatch(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return _host_dispatch_op(x, top_idx, top_w, self.host_key)
        return self.dispatch_on_host(x, top_idx, top_w)


# A host read cannot be captured: tagged, inductor keeps any CUDA graph away from the op.
@torch.library.custom_op("aria::host_dispatch", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def _host_dispatch_op(x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor,
                      store: torch.Tensor) -> torch.Tensor:
    return called(store).dispatch_on_host(x, top_idx, top_w)


@_host_dispatch_op.register_fake
def _(x, top_idx, top_w, store):
    return x.new_empty(x.shape)


def gathering_now(store: nn.Module, x: torch.Tensor) -> bool:
    """Whether `store` (switched by gather_experts_on_device) gathers for this step: a compiled
    one-token step. Eager steps keep the host-read dispatch: the copy only pays inside a graph."""
    return store.gathers and x.shape[0] == 1 and torch.compiler.is_compiling()


def gather_experts_on_device(model: nn.Module) -> bool:
    """Switch every MoE layer's experts to choosing on the device in compiled one-token steps, if
    every layer's store can (placed resident experts, float or quantized; an offloaded store
    reads the ids on the host by design). Returns whether it did, having switched all or none:
    if so, a compiled decode step reads nothing on the host and a CUDA graph can hold it."""
    stores = [module.experts for module in model.modules() if isinstance(module, MoEBlock)]
    if not stores or not all(getattr(store, "can_gather_on_device", lambda: False)() for store in stores):
        return False
    for store in stores:
        store.gather_on_device()
    return True
