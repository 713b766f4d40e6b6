"""Aria's text decoder: RMSNorm, rotate-half RoPE, attention on a static KV cache, MoE layers.

Math per ARIA_SPEC §2.1–§2.4. Module names follow the canonical checkpoint naming
(`language_model.model.layers.L.self_attn.q_proj` ...), so a state_dict is the checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig
from .decode_kernels import linear
from .kv_cache import KVCache
from .moe import MoEBlock


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale in the activation dtype (as the reference).
        # (F.rms_norm computes a bf16/fp16 input in fp32 and rounds once: the same numbers.)
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x, self.weight.shape, eps=self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for absolute positions, computed in fp32 and grown on the host side.

    The sin table carries rotate-half's sign (first half negated), see apply_rope.

    Tables are sized from host integers (`ensure`), never from position values, so looking
    positions up costs no device-to-host synchronisation.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponent), persistent=False)
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        self._typed: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def reset_parameters(self, head_dim: int, theta: float, device: torch.device | str) -> None:
        """Rebuild the (non-persistent) inverse frequencies, e.g. after building on the meta device."""
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
        self.inv_freq = 1.0 / (theta**exponent)
        self._cos = self._sin = None
        self._typed = {}

    def ensure(self, length: int) -> None:
        """Make the tables cover positions [0, length)."""
        if self._cos is None or self._cos.shape[0] < length or self._cos.device != self.inv_freq.device:
            size = max(length, 2 * (self._cos.shape[0] if self._cos is not None else 0), 256)
            pos = torch.arange(size, device=self.inv_freq.device, dtype=torch.float32)
            freqs = pos[:, None] * self.inv_freq[None, :]
            self._cos = torch.cat((freqs, freqs), dim=-1).cos()
            self._sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
            self._typed = {}

    def _tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Computed in fp32, cast once per activation dtype (not once per step).
        if dtype not in self._typed:
            self._typed[dtype] = (self._cos.to(dtype), self._sin.to(dtype))
        return self._typed[dtype]

    def span(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin [length, head_dim] for positions start..start+length-1, in `dtype`."""
        self.ensure(start + length)
        cos, sin = self._tables(dtype)
        return cos[start : start + length], sin[start : start + length]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] (device tensor, already covered by `ensure`) -> cos, signed sin [T, head_dim]."""
        cos, sin = self._tables(dtype)
        return cos[positions], sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, x*cos + cat(-x2, x1)*sin, as x*cos + roll(x)*signed_sin (the sign is in the table)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


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
        where: int | torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """`where`: first position as an int (the cache returns the valid prefix), or the positions
        as a device tensor (static shapes: the whole cache is attended, `mask` hides the rest).
        `mask` None means: no mask for one token, causal for a chunk (see TextModel._run)."""
        b, t, _ = x.shape
        q = self._heads(linear(self.q_proj, x), self.n_heads)
        k = self._heads(linear(self.k_proj, x), self.n_kv)
        v = self._heads(linear(self.v_proj, x), self.n_kv)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:  # training, one-shot scoring: the chunk attends to itself only
            keys, values = k, v
        elif isinstance(where, torch.Tensor):
            keys, values = cache.write_at(layer, where, k, v)
        else:
            keys, values = cache.update(layer, where, k, v)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=mask is None and t > 1, enable_gqa=self.n_kv != self.n_heads
        )
        return linear(self.o_proj, (out if t == 1 else out.transpose(1, 2)).reshape(b, t, -1))

    def _heads(self, y: torch.Tensor, n: int) -> torch.Tensor:
        """[b, t, n*d] -> [b, n, t, d]; for one token a view is enough (decode: fewer ops per step)."""
        b, t, _ = y.shape
        if t == 1:
            return y.view(b, n, 1, self.head_dim)
        return y.view(b, t, n, self.head_dim).transpose(1, 2)


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MoEBlock(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, where, mask) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, where, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.prefill_chunk = 1024  # tokens per prefill step (see forward)

    def forward(self, embeds: torch.Tensor, cache: KVCache | None, start: int | torch.Tensor,
                last_only: bool = False) -> torch.Tensor:
        """Hidden states of tokens at positions start.. (an int, or a device tensor [1] for static shapes);
        with `last_only`, of the last token only ([B, 1, H]).

        With a cache, a long prompt runs in chunks of `prefill_chunk` tokens, so no step holds a
        T x T attention mask or T x k expert activations: a 64K prompt costs 64K x chunk at most,
        and with `last_only` no chunk's output outlives the next chunk.
        """
        t = embeds.shape[1]
        if isinstance(start, torch.Tensor):
            out = self._run(embeds, cache, start + torch.arange(t, device=embeds.device))
        elif cache is None:
            out = self._run(embeds, None, 0)
        else:
            cache.check_room(start, t)
            step = self.prefill_chunk
            outs = []
            for a in range(0, t, step):
                chunk = self._run(embeds[:, a : a + step], cache, start + a)
                outs = [chunk[:, -1:]] if last_only else [*outs, chunk]
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out[:, -1:] if last_only else out

    def _run(self, x: torch.Tensor, cache: KVCache | None, where: int | torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if isinstance(where, torch.Tensor):
            cos, sin = self.rotary(where, x.dtype)
            # Static shapes: every step attends over the whole cache; unwritten slots are masked.
            mask = torch.arange(cache.max_len, device=x.device)[None, :] <= where[:, None]
        else:
            cos, sin = self.rotary.span(where, t, x.dtype)
            mask = None
            if cache is not None and t > 1 and where > 0:
                # A chunk after earlier positions: query i (at where+i) sees keys 0..where+i. (From
                # position 0, or for one token, SDPA's own causal / no mask says the same, cheaper.)
                q_pos = torch.arange(where, where + t, device=x.device)[:, None]
                mask = torch.arange(where + t, device=x.device)[None, :] <= q_pos
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, where, mask)
        return self.norm(x)


class CausalLM(nn.Module):
    """`language_model`: the decoder (`.model`) and the untied `lm_head` (pitfall P2)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.model = TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
