"""The one registry of quantization schemes: look a scheme up by name or by its config metadata."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import Scheme
from .int4 import Int4Scheme
from .int8 import Int8Scheme
from .nf4 import Nf4Scheme

DEFAULT_SCHEME = "int4"

_FACTORIES: dict[str, Callable[..., Scheme]] = {
    "int4": Int4Scheme,
    "int8": Int8Scheme,
    "nf4": Nf4Scheme,
}


def scheme_names() -> tuple[str, ...]:
    return tuple(_FACTORIES)


def get_scheme(name: str, **options: Any) -> Scheme:
    """A scheme by name, e.g. ``get_scheme("int4")`` or ``get_scheme("int4", group_size=64)``."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown quantization scheme '{name}'; choose one of {', '.join(_FACTORIES)}")
    try:
        return factory(**options)
    except TypeError:
        raise ValueError(f"scheme '{name}' does not take options {sorted(options)}") from None


def scheme_from_metadata(metadata: dict[str, Any]) -> Scheme:
    """Rebuild a scheme from what ``Scheme.metadata()`` wrote into a config."""
    if "scheme" not in metadata:
        raise ValueError(f"quantization metadata has no 'scheme' key: {metadata}")
    return get_scheme(metadata["scheme"], **{k: v for k, v in metadata.items() if k != "scheme"})
