"""Which Aria weights are quantized, how they are oriented, and the module family of every weight.

One table serves the converter (`aria quantize`), the quantized loader, on-the-fly quantization,
the bytes report and the placement planner, so they can never disagree about what is quantized.

Quantized: every decoder linear — attention q/k/v/o, the shared experts, all routed experts.
Kept in floating point: embeddings, norms, routers, vision tower, projector, lm_head (small, or
sensitive, or both). Routed experts are grouped [E, in, out] in float checkpoints; their packed
form is stored in linear orientation [E, out, in], which is what the matmul kernels take.
"""

from __future__ import annotations

import re

import torch

FAMILIES = (
    "routed experts",
    "shared experts",
    "attention",
    "router",
    "embeddings",
    "lm_head",
    "norms",
    "vision tower",
    "projector",
)
QUANTIZED_FAMILIES = ("routed experts", "shared experts", "attention")

_LAYER = r"language_model\.model\.layers\.\d+\."
_FAMILY_RULES = [
    ("routed experts", re.compile(_LAYER + r"mlp\.experts\.fc[12]\.weight\Z")),
    ("shared experts", re.compile(_LAYER + r"mlp\.shared_experts\.(gate|up|down)_proj\.weight\Z")),
    ("attention", re.compile(_LAYER + r"self_attn\.[qkvo]_proj\.weight\Z")),
    ("router", re.compile(_LAYER + r"mlp\.router\.weight\Z")),
    ("norms", re.compile(r"language_model\.model\.(layers\.\d+\.(input|post_attention)_layernorm|norm)\.weight\Z")),
    ("embeddings", re.compile(r"language_model\.model\.embed_tokens\.weight\Z")),
    ("lm_head", re.compile(r"language_model\.lm_head\.weight\Z")),
    ("vision tower", re.compile(r"vision_tower\.")),
    ("projector", re.compile(r"multi_modal_projector\.")),
]


def family_of(name: str) -> str:
    """The module family of a canonical weight name (for reports and planning)."""
    for family, pattern in _FAMILY_RULES:
        if pattern.match(name):
            return family
    raise ValueError(f"'{name}' is not a canonical Aria weight name")


def is_quantized(name: str) -> bool:
    return family_of(name) in QUANTIZED_FAMILIES


def is_grouped_expert(name: str) -> bool:
    return family_of(name) == "routed experts"


def stored_shape(name: str, shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """Shape of the weight as the quantizer sees it: [.., out, in]."""
    shape = tuple(shape)
    return shape[:-2] + (shape[-1], shape[-2]) if is_grouped_expert(name) else shape


def to_stored_orientation(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Float weight as the quantizer takes it ([.., out, in]); a view, no copy."""
    return tensor.transpose(-1, -2) if is_grouped_expert(name) else tensor


def packed_name(name: str, suffix: str) -> str:
    """Key of one packed tensor of a quantized weight, e.g. `...q_proj.weight.qdata`."""
    return f"{name}.{suffix}"
