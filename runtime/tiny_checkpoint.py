"""A tiny random Aria (same architecture, toy sizes) for tests, demos and benchmarks.

Sizes are chosen so every code path is exercised: several experts with top-k > 1, heads > 1,
and image crops of 980 and 490 pixels that become 196 and 49 patches (patch size 70) and 16
and 8 image tokens.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .checkpoint_writer import write_checkpoint
from .config import AriaConfig, TextConfig, VisionConfig

_TINY_TEXT = TextConfig(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=16,
    moe_intermediate_size=32,
    moe_num_experts=8,
    moe_topk=2,
    moe_num_shared_experts=2,
    rope_theta=5_000_000.0,
    max_position_embeddings=1024,
)
_TINY_VISION = VisionConfig(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=980, patch_size=70,
)
_VISION_PREFIX = "vision_"
TINY_TOKENIZER_PIECES = 512


def tiny_config(**overrides) -> AriaConfig:
    """A tiny AriaConfig. Overrides name a field of AriaConfig (e.g. `image_token_index`), of
    TextConfig (e.g. `num_hidden_layers=3`) or of VisionConfig prefixed with `vision_`
    (e.g. `vision_num_hidden_layers=1`); text wins for names both share."""
    text_fields = {f.name for f in dataclasses.fields(TextConfig)}
    vision_fields = {f.name for f in dataclasses.fields(VisionConfig)}
    top_fields = {f.name for f in dataclasses.fields(AriaConfig)} - {"text", "vision"}
    text, vision, top = {}, {}, {}
    for key, value in overrides.items():
        if key in top_fields:
            top[key] = value
        elif key in text_fields:
            text[key] = value
        elif key.startswith(_VISION_PREFIX) and key[len(_VISION_PREFIX):] in vision_fields:
            vision[key[len(_VISION_PREFIX):]] = value
        else:
            raise TypeError(f"tiny_config() got an unknown override '{key}'")
    if "hidden_size" in text or "num_attention_heads" in text:
        text.setdefault("head_dim", text.get("hidden_size", _TINY_TEXT.hidden_size)
                        // text.get("num_attention_heads", _TINY_TEXT.num_attention_heads))
    top.setdefault("patch_to_query", {49: 8, 196: 16})
    return AriaConfig(
        text=dataclasses.replace(_TINY_TEXT, **text),
        vision=dataclasses.replace(_TINY_VISION, **vision),
        **top,
    )


def random_state_dict(config: AriaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random canonical weights from the runtime model itself (so names and shapes are its own)."""
    from .model import build_model, init_random_weights  # lazy: tiny_config() needs no model

    model = init_random_weights(build_model(config, device="cpu"), seed)
    return model.state_dict()


def write_tiny_checkpoint(
    out_dir: str | Path,
    layout: str = "c1",
    seed: int = 0,
    config: AriaConfig | None = None,
    max_shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a random tiny Aria (config.json, generation_config.json, weights) to `out_dir`.

    A tiny Aria-shaped tokenizer.model (512 pieces) is added when the vocabulary can hold it,
    so the directory is a complete model for the CLI and the chat path.
    """
    from .tiny_tokenizer import train_tiny_tokenizer

    config = config or tiny_config()
    path = write_checkpoint(out_dir, random_state_dict(config, seed), config, layout, max_shard_bytes, dtype,
                            overwrite=overwrite)
    if config.text.vocab_size >= TINY_TOKENIZER_PIECES:
        train_tiny_tokenizer(path / "tokenizer.model", vocab_size=TINY_TOKENIZER_PIECES)
    return path
