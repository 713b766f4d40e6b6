"""Exact bytes of every part of the model at a given precision, counted on the meta device.

The planner budgets with these numbers before any weight is read, so they must be the bytes
the loaded model really occupies: each parameter of the meta-built model is sized either as a
float at the compute dtype or, for the weights runtime.quant_targets marks as quantized, as the
scheme's packed form (`Scheme.packed_nbytes`), the same table the converter and loader follow.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from quant import Scheme

from .config import AriaConfig
from .errors import UsageError
from .model import build_model
from .quant_targets import (
    FAMILIES,
    QUANTIZED_FAMILIES,
    family_of,
    first_unsupported,
    is_quantized,
    stored_shape,
)

ROUTED = "routed experts"


def tensor_bytes(name: str, shape: tuple[int, ...], scheme: Scheme | None, dtype: torch.dtype,
                 families: tuple[str, ...] = QUANTIZED_FAMILIES) -> int:
    """Bytes of one parameter as the runtime holds it (or `aria quantize` writes it): packed if
    quantized, else `dtype`. The shape must be one the scheme takes (quant_targets.first_unsupported)."""
    if scheme is not None and is_quantized(name, families):
        return scheme.packed_nbytes(stored_shape(name, shape))
    return math.prod(shape) * dtype.itemsize


@dataclass(frozen=True)
class WeightBytes:
    """Bytes per family (runtime.quant_targets.FAMILIES) for one config, scheme and dtype."""

    families: dict[str, int]
    expert: int  # one routed expert (fc1 + fc2) of one layer
    num_layers: int
    num_experts: int
    vocab_size: int
    # A scheme whose CUDA product dequantizes the whole weight first (int8 always, nf4 for more
    # than one row) holds its largest quantized matrix in the compute dtype for a moment.
    dequant_scratch: int = 0

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
        return (f["attention"] + f["shared experts"] + f["router"] + f["norms"] + f["lm_head"]
                + f["embeddings"] // self.vocab_size)


_SHAPES: dict[str, tuple[tuple[str, tuple[int, ...]], ...]] = {}


def parameter_shapes(config: AriaConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of every parameter of the meta-built model; cached, as planning asks often."""
    key = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if key not in _SHAPES:
        model = build_model(config)
        _SHAPES[key] = tuple((name, tuple(p.shape)) for name, p in model.named_parameters())
    return _SHAPES[key]


def weight_bytes(config: AriaConfig, scheme: Scheme | None = None, dtype: torch.dtype = torch.bfloat16,
                 quantized: tuple[str, ...] = QUANTIZED_FAMILIES) -> WeightBytes:
    """Count every parameter of the meta-built model (no memory is allocated); `quantized`: the
    families `scheme` packs."""
    if scheme is not None:  # the converter refuses such a model outright; so does the planner
        problem = first_unsupported(scheme, parameter_shapes(config), quantized)
        if problem:
            raise UsageError(f"{problem}; choose another --scheme")
    families = dict.fromkeys(FAMILIES, 0)
    expert_shapes = []
    largest_quantized = 0  # elements of one quantized matrix
    for name, shape in parameter_shapes(config):
        families[family_of(name)] += tensor_bytes(name, shape, scheme, dtype, quantized)
        if family_of(name) == ROUTED and ".layers.0." in name:
            expert_shapes.append((name, (1, *shape[1:])))  # fc1 and fc2 of a single expert
        if scheme is not None and is_quantized(name, quantized):
            largest_quantized = max(largest_quantized, math.prod(stored_shape(name, shape)[-2:]))
    expert = sum(tensor_bytes(name, shape, scheme, dtype, quantized) for name, shape in expert_shapes)
    t = config.text
    scratch = largest_quantized * dtype.itemsize if scheme is not None and scheme.cuda_dequantizes else 0
    result = WeightBytes(families, expert, t.num_hidden_layers, t.moe_num_experts, t.vocab_size, scratch)
    if result.routed != expert * t.num_hidden_layers * t.moe_num_experts:
        raise RuntimeError("routed expert bytes are not a whole number of experts; the scheme's sizes are inconsistent")
    return result
