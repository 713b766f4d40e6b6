"""Exact bytes of every part of the model at a given precision, counted on the meta device.

The planner budgets with these numbers before any weight is read, so they must be the bytes
the loaded model really occupies: each parameter of the meta-built model is sized either as a
float at the compute dtype or, for the modules quantization applies to (attention q/k/v/o,
routed experts, shared experts), as the scheme's packed form (`Scheme.packed_nbytes`). A weight
whose shape a scheme cannot take stays float, exactly as the converter leaves it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import torch

from quant import Scheme

from .config import AriaConfig
from .model import build_model

# Families, in the order tables list them.
VISION = "vision tower + projector"
EMBED = "token embedding"
LM_HEAD = "lm_head"
ATTENTION = "attention"
SHARED = "shared experts"
ROUTERS_NORMS = "routers + norms"
ROUTED = "routed experts"

_LAYER = r"^language_model\.model\.layers\.\d+\."
_FAMILY_PATTERNS = (
    (re.compile(r"^(vision_tower|multi_modal_projector)\."), VISION),
    (re.compile(r"^language_model\.model\.embed_tokens\."), EMBED),
    (re.compile(r"^language_model\.lm_head\."), LM_HEAD),
    (re.compile(_LAYER + r"self_attn\.[qkvo]_proj\.weight$"), ATTENTION),
    (re.compile(_LAYER + r"mlp\.shared_experts\.(gate|up|down)_proj\.weight$"), SHARED),
    (re.compile(_LAYER + r"mlp\.experts\.fc[12]\.weight$"), ROUTED),
)
QUANTIZED_FAMILIES = (ATTENTION, SHARED, ROUTED)


def family_of(name: str) -> str:
    for pattern, family in _FAMILY_PATTERNS:
        if pattern.search(name):
            return family
    return ROUTERS_NORMS


def linear_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The [..., out, in] shape a quantizer sees: routed experts are stored [E, in, out]."""
    if family_of(name) == ROUTED:
        return (*shape[:-2], shape[-1], shape[-2])
    return shape


def tensor_bytes(name: str, shape: tuple[int, ...], scheme: Scheme | None, dtype: torch.dtype) -> int:
    """Bytes of one parameter as the runtime holds it: packed if quantized, else `dtype`."""
    if scheme is not None and family_of(name) in QUANTIZED_FAMILIES:
        qshape = linear_shape(name, shape)
        if scheme.why_unsupported(qshape) is None:
            return scheme.packed_nbytes(qshape)
    return math.prod(shape) * dtype.itemsize


@dataclass(frozen=True)
class WeightBytes:
    """Bytes per family for one config, scheme and compute dtype."""

    families: dict[str, int]
    expert: int  # one routed expert (fc1 + fc2) of one layer
    num_layers: int
    num_experts: int
    vocab_size: int

    @property
    def total(self) -> int:
        return sum(self.families.values())

    @property
    def routed(self) -> int:
        return self.families[ROUTED]

    @property
    def dense(self) -> int:
        """Everything but the routed experts: what must sit on the device whatever the plan."""
        return self.total - self.routed

    @property
    def active_dense(self) -> int:
        """Non-routed bytes read per decoded token: the vision side is idle and the embedding
        is a one-row gather."""
        f = self.families
        return f[ATTENTION] + f[SHARED] + f[ROUTERS_NORMS] + f[LM_HEAD] + f[EMBED] // self.vocab_size


_SHAPES: dict[str, tuple[tuple[str, tuple[int, ...]], ...]] = {}


def parameter_shapes(config: AriaConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of every parameter of the meta-built model; cached, as planning asks often."""
    key = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if key not in _SHAPES:
        model = build_model(config)
        _SHAPES[key] = tuple((name, tuple(p.shape)) for name, p in model.named_parameters())
    return _SHAPES[key]


def weight_bytes(config: AriaConfig, scheme: Scheme | None = None, dtype: torch.dtype = torch.bfloat16) -> WeightBytes:
    """Count every parameter of the meta-built model (no memory is allocated)."""
    families = {f: 0 for f in (VISION, EMBED, LM_HEAD, ATTENTION, SHARED, ROUTERS_NORMS, ROUTED)}
    for name, shape in parameter_shapes(config):
        families[family_of(name)] += tensor_bytes(name, shape, scheme, dtype)
    t = config.text
    h, i = t.hidden_size, t.moe_intermediate_size
    # One expert is fc1 [2I, H] + fc2 [H, I] in linear orientation; the names only pick the family.
    fc1 = tensor_bytes("language_model.model.layers.0.mlp.experts.fc1.weight", (1, h, 2 * i), scheme, dtype)
    fc2 = tensor_bytes("language_model.model.layers.0.mlp.experts.fc2.weight", (1, i, h), scheme, dtype)
    result = WeightBytes(families, fc1 + fc2, t.num_hidden_layers, t.moe_num_experts, t.vocab_size)
    if result.routed != result.expert * t.num_hidden_layers * t.moe_num_experts:
        raise RuntimeError("routed expert bytes are not a whole number of experts; the scheme's sizes are inconsistent")
    return result
