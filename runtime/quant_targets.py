"""Which Aria weights are quantized, how they are oriented, and the module family of every weight.

One table serves the converter (`aria quantize`), the quantized loader, on-the-fly quantization,
the bytes report and the placement planner, so they can never disagree about what is quantized.

Quantized: every decoder linear — attention q/k/v/o, the shared experts, all routed experts.
Kept in floating point: embeddings, norms, routers, vision tower, projector (small, or
sensitive, or both), and lm_head unless asked (`--quant-lm-head`): it is a large share of what
a decode step reads (a fifth of Aria's active int4 bytes), but every logit goes through it.
A quantized checkpoint lists its families in config.json's `quantization.modules`.

Routed experts are grouped [E, in, out] in float checkpoints; their packed form is stored in
linear orientation [E, out, in], which is what the matmul kernels take.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

from .errors import CheckpointError, UsageError

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
OPTIONAL_FAMILIES = ("lm_head",)  # quantized only when asked

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


def quantized_families(lm_head: bool = False) -> tuple[str, ...]:
    return QUANTIZED_FAMILIES + (OPTIONAL_FAMILIES if lm_head else ())


def families_to_load(quantization: dict | None, quant_lm_head: bool) -> tuple[str, ...]:
    """The families a load quantizes: a quantized checkpoint's own list (config.json's
    `quantization.modules`), else the defaults plus lm_head when `--quant-lm-head` asks."""
    if quantization is None:
        return quantized_families(lm_head=quant_lm_head)
    listed = tuple(quantization.get("modules", QUANTIZED_FAMILIES))
    if not set(QUANTIZED_FAMILIES) <= set(listed) <= set(QUANTIZED_FAMILIES + OPTIONAL_FAMILIES):
        raise CheckpointError(f"config.json lists quantized modules {list(listed)}, which this aria cannot "
                              "load; re-run aria quantize")
    if quant_lm_head and "lm_head" not in listed:
        raise UsageError("this model was quantized with its lm_head kept; drop --quant-lm-head, "
                         "or re-run aria quantize with --quant-lm-head")
    return listed


def is_quantized(name: str, families: tuple[str, ...] = QUANTIZED_FAMILIES) -> bool:
    return family_of(name) in families


def first_unsupported(scheme, shapes: Iterable[tuple[str, Sequence[int]]], families: tuple[str, ...]) -> str | None:
    """"NAME: reason" for the first weight of `families` among (name, shape as stored in a float
    checkpoint) whose packed shape `scheme`'s kernels cannot take, else None."""
    for name, shape in shapes:
        if is_quantized(name, families):
            problem = scheme.why_unsupported(stored_shape(name, shape))
            if problem:
                return f"{name}: {problem}"
    return None


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
