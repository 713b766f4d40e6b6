"""Aria's vision tower: a SigLIP/Idefics3 "NaViT" ViT with a patch mask (ARIA_SPEC §2.6).

Differences from a plain ViT that matter: positions of the valid patches are bucketed onto the
full position table (so a 490 crop is stretched, not cropped), padded patches are masked out as
keys, and the post-layernorm is NOT applied (pitfall P3; the hub checkpoint stores zeros there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


def patch_mask_from_pixel_mask(pixel_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, S, S] bool pixel mask -> [N, S/p, S/p] bool: a patch is valid if any pixel in it is."""
    n, s, _ = pixel_mask.shape
    g = s // patch_size
    tiles = pixel_mask[:, : g * patch_size, : g * patch_size].reshape(n, g, patch_size, g, patch_size)
    return tiles.any(dim=4).any(dim=2)


def bucketed_position_ids(patch_mask: torch.Tensor, side: int) -> torch.Tensor:
    """NaViT fractional positions: [N, g, g] patch mask -> [N, g*g] ids into a side x side table.

    The valid region is the top-left nh x nw patches; row i maps to bucket floor(i*side/nh)
    computed with the reference's exact fp32 ops (bucketize on arange(1/side, 1, 1/side)).
    Padded patches get id 0.
    """
    n, g, _ = patch_mask.shape
    device = patch_mask.device
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device)
    nh = patch_mask[:, :, 0].sum(dim=1)
    nw = patch_mask[:, 0, :].sum(dim=1)
    idx = torch.arange(g, device=device, dtype=torch.float32)
    coords_h = torch.clamp(idx[None, :] * (1.0 / nh)[:, None], max=1.0 - 1e-6)
    coords_w = torch.clamp(idx[None, :] * (1.0 / nw)[:, None], max=1.0 - 1e-6)
    bucket_h = torch.bucketize(coords_h, boundaries, right=True)
    bucket_w = torch.bucketize(coords_w, boundaries, right=True)
    ids = (bucket_h[:, :, None] * side + bucket_w[:, None, :]).reshape(n, -1)
    return torch.where(patch_mask.reshape(n, -1), ids, torch.zeros_like(ids))


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.side = config.num_positions_per_side
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(self.side**2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [N, P, D], row-major patches
        return x + self.position_embedding(bucketed_position_ids(patch_mask, self.side))


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        n, p, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, p, self.n_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), attn_mask=key_mask
        )
        return self.out_proj(out.transpose(1, 2).reshape(n, p, d))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), key_mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S], patch_mask [N, g, g] -> features [N, g*g, D] (no post-LN)."""
        x = self.embeddings(pixel_values, patch_mask)
        # Padded patches are masked as keys; their own (query) rows are computed and ignored later.
        key_mask = patch_mask.reshape(x.shape[0], 1, 1, -1)
        for layer in self.encoder.layers:
            x = layer(x, key_mask)
        return x
