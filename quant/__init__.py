"""Quantization schemes and kernels. Knows tensors, not Aria."""

from .base import Prepared, Scheme, slice_packed
from .linear import QuantizedLinear
from .schemes import DEFAULT_SCHEME, get_scheme, scheme_from_metadata, scheme_names
from .stacked import StackedPrepared, stack_prepared

__all__ = [
    "DEFAULT_SCHEME",
    "Prepared",
    "QuantizedLinear",
    "Scheme",
    "StackedPrepared",
    "get_scheme",
    "scheme_from_metadata",
    "scheme_names",
    "slice_packed",
    "stack_prepared",
]
