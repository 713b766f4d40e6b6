"""Checkpoint directory -> ready model: config, meta-device build, strict mmap load, buffers."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_weights
from .config import load_config
from .model import AriaForConditionalGeneration, build_model


def load_model(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> AriaForConditionalGeneration:
    """Load an Aria checkpoint in any supported layout. `dtype=None` keeps the stored dtype."""
    config = load_config(path)
    model = build_model(config)  # meta: no memory until the checkpoint's tensors are assigned
    load_weights(model, path, dtype=dtype, device=device)
    model.reset_buffers()
    return model.eval()
