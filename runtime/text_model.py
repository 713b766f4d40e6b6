"""Aria's text decoder: RMSNorm, rotate-half RoPE, attention on a static KV cache, MoE layers.

Math per ARIA_SPEC §2.1–§2.4. Module names follow the canonical checkpoint naming
(`language_model.model.layers.L.self_attn.q_proj` ...), so a state_dict is the checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig
from .kv_cache import KVCache
from .moe import MoEBlock


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale in the activation dtype (as the reference).
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for absolute positions, computed in fp32 and built lazily up to the need."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponent), persistent=False)
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def reset_parameters(self, head_dim: int, theta: float, device: torch.device | str) -> None:
        """Rebuild the (non-persistent) inverse frequencies, e.g. after building on the meta device."""
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
        self.inv_freq = 1.0 / (theta**exponent)
        self._cos = self._sin = None

    def _tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < length or self._cos.device != self.inv_freq.device:
            size = max(length, 2 * (self._cos.shape[0] if self._cos is not None else 0), 256)
            pos = torch.arange(size, device=self.inv_freq.device, dtype=torch.float32)
            freqs = pos[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = emb.cos(), emb.sin()
        return self._cos, self._sin

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, head_dim] in `dtype`."""
        cos, sin = self._tables(int(positions.max()) + 1)
        return cos[positions].to(dtype), sin[positions].to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        layer: int,
        start: int,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Without a cache (training, one-shot scoring) the chunk attends to itself only.
        keys, values = (k, v) if cache is None else cache.update(layer, start, k, v)
        # Query i sits at absolute position start+i and sees keys 0..start+i. A single new token
        # sees the whole valid prefix, so decode needs no mask at all.
        mask = None
        if t > 1:
            n_keys = keys.shape[2]
            q_pos = torch.arange(n_keys - t, n_keys, device=x.device)[:, None]
            mask = torch.arange(n_keys, device=x.device)[None, :] <= q_pos
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MoEBlock(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, start: int) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, start)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(self, embeds: torch.Tensor, cache: KVCache | None, start: int) -> torch.Tensor:
        t = embeds.shape[1]
        if cache is not None:
            cache.check_room(start, t)
        positions = torch.arange(start, start + t, device=embeds.device)
        cos, sin = self.rotary(positions, embeds.dtype)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, start)
        return self.norm(x)


class CausalLM(nn.Module):
    """`language_model`: the decoder (`.model`) and the untied `lm_head` (pitfall P2)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.model = TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
