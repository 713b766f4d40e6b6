"""Aria's projector: learned queries cross-attend to the vision features, then an FFN to text width.

ARIA_SPEC §2.7 and pitfall P4: q/k/v each go through TWO linear maps (the explicit q/k/v_proj,
then the MultiheadAttention's own in_proj with bias); all three LayerNorms use eps 1e-5; no
residual anywhere. The number of queries depends on the number of patches of the crop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import AriaConfig
from .errors import InputError

_PROJECTOR_LN_EPS = 1e-5  # PyTorch's LayerNorm default, which the reference uses here


class MultiheadAttentionWeights(nn.Module):
    """nn.MultiheadAttention's parameters under its own names, applied with SDPA."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        n, lq, d = q.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, t.shape[1], self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(F.linear(q, wq, bq)), heads(F.linear(k, wk, bk)), heads(F.linear(v, wv, bv)), attn_mask=key_mask
        )
        return self.out_proj(out.transpose(1, 2).reshape(n, lq, d))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.multihead_attn = MultiheadAttentionWeights(dim, heads)
        self.linear = nn.Linear(dim, dim)
        self.layer_norm = nn.LayerNorm(dim, eps=_PROJECTOR_LN_EPS)  # on the queries
        self.layer_norm_kv = nn.LayerNorm(dim, eps=_PROJECTOR_LN_EPS)

    def forward(self, features: torch.Tensor, queries: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(self.layer_norm(queries))
        kv = self.layer_norm_kv(features)
        out = self.multihead_attn(q, self.k_proj(kv), self.v_proj(kv), key_mask)
        return self.linear(out)


class ProjectorFFN(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.linear_in = nn.Linear(d_in, d_hidden, bias=False)
        self.linear_out = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(F.gelu(self.linear_in(x), approximate="tanh"))


class Projector(nn.Module):
    def __init__(self, config: AriaConfig):
        super().__init__()
        dv, dt = config.vision.hidden_size, config.text.hidden_size
        self.patch_to_query = dict(config.patch_to_query)
        self.query = nn.Parameter(torch.empty(config.max_queries, dv))
        self.cross_attn = CrossAttention(dv, config.vision.num_attention_heads)
        self.layer_norm = nn.LayerNorm(dv, eps=_PROJECTOR_LN_EPS)
        self.feed_forward = ProjectorFFN(dv, dt, dt)

    def forward(self, features: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """features [N, P, Dv], patch_mask [N, g, g] -> [N, Q, Dt] with Q = patch_to_query[P]."""
        n, p, _ = features.shape
        if p not in self.patch_to_query:
            raise InputError(f"a crop of {p} patches is not supported; crops must give {sorted(self.patch_to_query)}")
        queries = self.query[: self.patch_to_query[p]].unsqueeze(0).expand(n, -1, -1)
        key_mask = patch_mask.reshape(n, 1, 1, p)
        out = self.cross_attn(features, queries, key_mask)
        return self.feed_forward(self.layer_norm(out))
