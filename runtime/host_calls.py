"""Host-side Python run from inside a compiled step as one opaque op.

Some steps of a layer decide on the host from data on the device: which quantized kernels to
call, which offloaded experts to copy or compute where. Traced by torch.compile, the host read
either ends the graph (and, nested as it is, splits every enclosing frame into several graphs)
or specialises it on the values (a recompile per new expert set). As a custom op the step is
opaque to the compiler and runs eagerly in place, so a decode step stays one graph.

A custom op takes tensors and plain values, not Python objects: the object is found by a key,
passed as a tensor. An int would be baked into the graph and guarded on, so every new model
(with new keys) would compile the step again.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

_OBJECTS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


class HostCalled:
    """Mixin for objects called from a custom op: `host_key`, a 0-dim int64 CPU tensor (a plain
    attribute, so moving a model leaves it on the CPU), finds them (`called`)."""

    def _register(self) -> None:
        key = id(self)
        _OBJECTS[key] = self
        object.__setattr__(self, "host_key", torch.tensor(key, dtype=torch.int64))

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A deep copy or an unpickled object gets its own key, not its original's.
        parent = getattr(super(), "__setstate__", None)
        if parent is not None:
            parent(state)
        else:
            self.__dict__.update(state)
        self._register()


def called(key: torch.Tensor) -> Any:
    return _OBJECTS[int(key)]
