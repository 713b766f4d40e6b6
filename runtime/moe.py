"""Aria's mixture-of-experts block (ARIA_SPEC §2.5).

router top-k on the raw logits -> softmax over the k selected logits (fp32, as the original)
-> SwiGLU experts (first half of fc1 is the gate) -> weighted sum -> plus the always-on shared MLP.

Routed expert weights are stored grouped as the checkpoints have them, [experts, in, out], so a
loaded tensor is the mmap'd checkpoint tensor itself (no transpose, no copy). Experts run one
matmul per used expert over the tokens routed to it (tokens sorted by expert), which serves both
decode (a handful of tokens) and prefill. `routed_sum` is that dispatch, shared by every expert
store (float, quantized, offloaded): each only says how to run one expert on some tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig


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
    `expert_order` lets an offloaded store run resident experts first while misses arrive.
    """
    k = top_idx.shape[1]
    flat = top_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    starts = [0] * num_experts
    for e in range(1, num_experts):
        starts[e] = starts[e - 1] + counts[e - 1]
    token_of = order // k  # which token each sorted (token, choice) pair belongs to
    weight_of = top_w.reshape(-1)[order]
    out = torch.zeros_like(x)
    for expert in expert_order if expert_order is not None else range(num_experts):
        n = counts[expert]
        if n == 0:
            continue
        rows = slice(starts[expert], starts[expert] + n)
        y = run_expert(expert, x[token_of[rows]]) * weight_of[rows, None]
        out.index_add_(0, token_of[rows], y.to(out.dtype))
    return out


class RoutedExperts(nn.Module):
    """Float experts, grouped [experts, in, out] as stored in the checkpoints."""

    def __init__(self, config: TextConfig):
        super().__init__()
        h, i, e = config.hidden_size, config.moe_intermediate_size, config.moe_num_experts
        self.num_experts = e
        self.fc1 = GroupedWeight(e, h, 2 * i)  # columns [0, i) = gate, [i, 2i) = up
        self.fc2 = GroupedWeight(e, i, h)

    def run_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return swiglu_expert(x, self.fc1.weight[expert], self.fc2.weight[expert])

    def forward(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        return routed_sum(x, top_idx, top_w, self.num_experts, self.run_expert)


class SharedExperts(nn.Module):
    """The two shared experts, fused into one SwiGLU MLP of width 2 x expert width."""

    def __init__(self, config: TextConfig):
        super().__init__()
        h, w = config.hidden_size, config.shared_intermediate_size
        self.gate_proj = nn.Linear(h, w, bias=False)
        self.up_proj = nn.Linear(h, w, bias=False)
        self.down_proj = nn.Linear(w, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.top_k = config.moe_topk
        self.router = nn.Linear(config.hidden_size, config.moe_num_experts, bias=False)
        self.experts = RoutedExperts(config)
        self.shared_experts = SharedExperts(config)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (expert ids [N, k], weights [N, k]) in x's dtype."""
        logits = self.router(x)
        top_logits, top_idx = torch.topk(logits, self.top_k, dim=-1)
        return top_idx, torch.softmax(top_logits.float(), dim=-1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        top_idx, top_w = self.route(flat)
        routed = self.experts(flat, top_idx, top_w)
        return (routed + self.shared_experts(flat)).reshape(shape)
