"""The whole Aria model: vision tower -> projector -> image features merged into the text decoder.

`AriaForConditionalGeneration(config)` has a state_dict whose keys are exactly the canonical
checkpoint names (hub layout minus the unused vision post_layernorm), so loading a checkpoint is
renaming its keys once (runtime.checkpoint_layouts) and assigning tensors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import AriaConfig
from .errors import InputError
from .kv_cache import KVCache
from .projector import Projector
from .text_model import CausalLM
from .vision import VisionTower, patch_mask_from_pixel_mask


class AriaForConditionalGeneration(nn.Module):
    def __init__(self, config: AriaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision)
        self.multi_modal_projector = Projector(config)
        self.language_model = CausalLM(config.text)

    # Read off the embedding table: never quantized, and on the compute device in every placement.
    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    def image_features(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        """Crops [N, 3, S, S] + masks [N, S, S] -> text-space features [N, Q, H]."""
        # Preprocessing makes host tensors; the tower may sit on a GPU.
        device = self.vision_tower.embeddings.patch_embedding.weight.device
        patch_mask = patch_mask_from_pixel_mask(pixel_mask.to(device).bool(), self.config.vision.patch_size)
        features = self.vision_tower(pixel_values.to(device, self.vision_dtype), patch_mask)
        return self.multi_modal_projector(features, patch_mask)

    @property
    def vision_dtype(self) -> torch.dtype:
        return self.vision_tower.embeddings.patch_embedding.weight.dtype

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features written over the `<|img|>` positions, in order."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_index
        n_slots = int(is_image.sum())
        if pixel_values is None:
            if n_slots:
                raise InputError(f"the prompt has {n_slots} image tokens but no image was given")
            return embeds
        features = self.image_features(pixel_values, pixel_mask)
        if features.shape[0] * features.shape[1] != n_slots:
            raise InputError(
                f"the prompt has {n_slots} image tokens but the images give "
                f"{features.shape[0] * features.shape[1]} features; build prompts with the chat template"
            )
        embeds[is_image] = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None,
        start: int = 0,
        pixel_values: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run tokens at positions [start, start+T) and return logits (float32).

        With `cache=None` the tokens attend only to each other (training and one-shot scoring).
        Returns [B, T, V] with `all_logits`, else only the last position's [B, V]: the vocabulary
        projection of every prompt token is the single largest waste in a prefill.
        """
        embeds = self.embed(input_ids, pixel_values, pixel_mask)
        hidden = self.language_model.model(embeds, cache, start, last_only=not all_logits)
        if not all_logits:
            hidden = hidden[:, -1]
        return self.language_model.lm_head(hidden).float()

    def new_cache(self, max_len: int, batch_size: int = 1) -> KVCache:
        return KVCache(self.config.text, max_len, batch_size, dtype=self.dtype, device=self.device)

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (RoPE) after weights were assigned onto a meta-built model."""
        t = self.config.text
        self.language_model.model.rotary.reset_parameters(t.head_dim, t.rope_theta, self.device)


def build_model(config: AriaConfig, device: str | torch.device = "meta", dtype: torch.dtype | None = None):
    """Build without allocating (meta) or allocated on `device`; weights are set by the loader."""
    with torch.device(device):
        model = AriaForConditionalGeneration(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def init_random_weights(model: AriaForConditionalGeneration, seed: int = 0) -> AriaForConditionalGeneration:
    """Deterministic random weights of a sensible scale, for tiny test/bench/demo checkpoints.

    Matrices get std 1/sqrt(fan_in) so activations stay O(1) through the layers; norms get
    weights near 1 and small biases; embeddings and the query table std 1. Random, but not
    degenerate: greedy tokens then depend on every part of the model.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            raise ValueError("materialise the model (build_model(config, device='cpu')) before init")
        shape = param.shape
        if name.endswith(("experts.fc1.weight", "experts.fc2.weight")):
            std = 1 / math.sqrt(shape[1])  # [experts, in, out]
        elif name.endswith(("embed_tokens.weight", "position_embedding.weight", "projector.query")):
            std = 1.0
        elif param.ndim >= 2:
            std = 1 / math.sqrt(param[0].numel())
        elif "norm" in name and name.endswith("weight"):
            values = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            param.copy_(values.to(param.dtype))
            continue
        else:
            std = 0.02
        param.copy_((std * torch.randn(shape, generator=gen)).to(param.dtype))
    return model


def parameter_count(config: AriaConfig) -> int:
    """Parameters of the model for `config`, counted on the meta device (no memory used)."""
    return sum(p.numel() for p in build_model(config).parameters())
