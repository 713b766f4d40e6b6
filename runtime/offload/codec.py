"""What the offload engine knows about an expert: a dict of named tensors and how to run it.

The engine never looks inside an expert. A codec gives, for any expert of a layer, its
*payload* (the tensors a given device's kernel wants, e.g. float fc1/fc2, or quantized codes and
scales in that device's packed layout) and a `compute(payload, x)` that runs the expert on
whatever device the payload sits on. Float and quantized experts plug in alike; a new expert
store only needs an `expert_codec()` method returning one of these.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from quant import Prepared, Scheme, slice_packed

from ..moe import RoutedExperts, swiglu, swiglu_expert


class ExpertCodec(ABC):
    num_experts: int

    @abstractmethod
    def payload(self, expert: int, device: torch.device) -> dict[str, Tensor]:
        """The tensors of `expert` laid out for `device`'s kernels (they may sit in any memory)."""

    @abstractmethod
    def compute(self, tensors: dict[str, Tensor], x: Tensor) -> Tensor:
        """Run the expert whose payload is `tensors` on x [N, H]; everything on one device."""

    def layout_key(self, device: torch.device) -> str:
        """Payloads for devices with equal keys are byte-identical, so one host copy serves both."""
        return "any"

    def release_sources(self) -> None:
        """Drop references to the original weights once payloads are copied out."""


class FloatExpertCodec(ExpertCodec):
    """Float grouped weights fc1 [E, H, 2I], fc2 [E, I, H] (the checkpoint layout)."""

    def __init__(self, fc1: Tensor, fc2: Tensor):
        self.num_experts = fc1.shape[0]
        self._fc1, self._fc2 = fc1, fc2

    def payload(self, expert: int, device: torch.device) -> dict[str, Tensor]:
        return {"fc1": self._fc1[expert], "fc2": self._fc2[expert]}

    def compute(self, tensors: dict[str, Tensor], x: Tensor) -> Tensor:
        return swiglu_expert(x, tensors["fc1"], tensors["fc2"])

    def release_sources(self) -> None:
        self._fc1 = self._fc2 = None


class QuantizedExpertCodec(ExpertCodec):
    """Quantized experts: packed fc1 [E, 2I, H] and fc2 [E, H, I] (linear orientation) of `scheme`.

    A payload is the scheme's prepared tensors for that device (prefixed `fc1.` / `fc2.`); the
    kernels differ per device type, and so does the layout unless the scheme says it is the same
    everywhere (int8): then the host computes on the device rows and keeps no second copy.
    """

    def __init__(self, scheme: Scheme, fc1: dict[str, Tensor], fc2: dict[str, Tensor], dtype: torch.dtype):
        self.scheme, self.dtype = scheme, dtype
        self._packed = {"fc1": fc1, "fc2": fc2}
        self._shapes = {name: scheme.weight_shape(p)[-2:] for name, p in self._packed.items()}
        self.num_experts = scheme.weight_shape(fc1)[0]
        self._kernels: dict[tuple[str, str], object] = {}  # (device type, matrix) -> kernel

    def payload(self, expert: int, device: torch.device) -> dict[str, Tensor]:
        out = {}
        device_type = torch.device(device).type
        for name, packed in self._packed.items():
            prepared = self.scheme.prepare(slice_packed(packed, expert), device, self.dtype)
            self._kernels[(device_type, name)] = prepared.kernel
            if self.scheme.same_layout_on_every_device and ("cpu", name) not in self._kernels:
                # The host computes on these same bytes (one store row serves both): learn its kernel once.
                self._kernels[("cpu", name)] = self.scheme.prepare(slice_packed(packed, expert), "cpu", self.dtype).kernel
            out.update({f"{name}.{key}": t for key, t in prepared.tensors.items()})
        return out

    def _linear(self, name: str, tensors: dict[str, Tensor], x: Tensor) -> Tensor:
        prefix = name + "."
        mine = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
        device = next(iter(mine.values())).device
        out_features, in_features = self._shapes[name]
        # The host rows hold kernel layouts only; where that is the stored form too, large
        # batches (prefill) take the scheme's dequantize-and-GEMM path as resident weights do.
        plain = self.scheme.plain_from_cpu_tensors(mine) if device.type == "cpu" else {}
        prepared = Prepared(self.scheme.name, out_features, in_features, device, self.dtype,
                            self._kernels[(device.type, name)], mine, plain)
        return self.scheme.matmul(x, prepared)

    def compute(self, tensors: dict[str, Tensor], x: Tensor) -> Tensor:
        return self._linear("fc2", tensors, swiglu(self._linear("fc1", tensors, x)))

    def layout_key(self, device: torch.device) -> str:
        return "any" if self.scheme.same_layout_on_every_device else torch.device(device).type

    def release_sources(self) -> None:
        self._packed = {}


def codec_for(experts: nn.Module) -> ExpertCodec:
    """The codec of a layer's `mlp.experts` module."""
    if isinstance(experts, RoutedExperts):
        return FloatExpertCodec(experts.fc1.weight.detach(), experts.fc2.weight.detach())
    make = getattr(experts, "expert_codec", None)
    if callable(make):
        return make()
    raise TypeError(f"cannot offload experts of type {type(experts).__name__}: give it an expert_codec() method")
