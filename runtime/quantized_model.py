"""Quantized Aria: swap the decoder linears for quantized ones, from float weights or packed ones.

The modules to swap are named by runtime.quant_targets; the kernels come from quant/. Two ways
in, one set of modules:
- `quantize_model(model, scheme)`: a loaded float model (mmap views) is quantized weight by
  weight, each source released as soon as it is packed, so memory stays near the quantized size;
- `install_packed(model, scheme, get_packed)`: a meta-built model receives packed tensors from a
  quantized checkpoint (what `aria quantize` wrote) without ever seeing floats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from quant import Prepared, QuantizedLinear, Scheme, StackedPrepared, slice_packed, stack_prepared

from .moe import DispatchesOnHost, RoutedExperts, gathering_now, one_token_routed_sum, routed_sum, swiglu
from .quant_targets import (
    FAMILIES,
    QUANTIZED_FAMILIES,
    family_of,
    first_unsupported,
    is_quantized,
    to_stored_orientation,
)

PackedGetter = Callable[[str], dict[str, torch.Tensor]]  # weight name -> packed tensors


class QuantizedRoutedExperts(DispatchesOnHost):
    """Routed experts with fc1 [E, 2I, H] and fc2 [E, H, I] packed, prepared once per expert."""

    def __init__(self, scheme: Scheme, fc1: dict[str, torch.Tensor], fc2: dict[str, torch.Tensor],
                 device: torch.device | str | None, dtype: torch.dtype):
        """`device` None: staged in host memory, prepared for nothing yet (the offload engine and
        move_model prepare from the packed form for where the experts end up)."""
        super().__init__()
        self.scheme = scheme
        self.dtype = dtype
        # The packed form (for a quantized checkpoint: mmap views) is what the offload engine and
        # a move to another device prepare from; see keeps_packed for when it is let go.
        self._packed: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = (fc1, fc2)
        self.num_experts = scheme.weight_shape(fc1)[0]
        scheme.weight_shape(fc2)  # checks fc2's packed form now, even when nothing is prepared yet
        self.fc1: list[Prepared] = []
        self.fc2: list[Prepared] = []
        self._stacks: tuple[StackedPrepared, StackedPrepared] | None = None  # fc1/fc2's blocks
        self.gathers = False  # see gather_on_device
        if device is not None:
            self.prepare_for(device)

    def run_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        mm = self.scheme.matmul
        return mm(swiglu(mm(x, self.fc1[expert])), self.fc2[expert])

    def forward(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        if gathering_now(self, x):
            return self._gathered(x, top_idx, top_w)
        return self.host_dispatch(x, top_idx, top_w)

    def dispatch_on_host(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        self._check_placed()
        if x.shape[0] == 1 and x.device.type == "cpu":
            mm = self.scheme.matmul
            return one_token_routed_sum(x, top_idx[0].tolist(), top_w, lambda e, xe: mm(xe, self.fc1[e]),
                                        lambda e, a: mm(a, self.fc2[e]))
        return routed_sum(x, top_idx, top_w, self.num_experts, self.run_expert)

    def _gathered(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        """One token, its experts' kernel tensors copied out by device index: no host read."""
        stack1, stack2 = self._stacks
        w1, w2 = stack1.gather(top_idx[0]), stack2.gather(top_idx[0])
        mm = self.scheme.matmul
        return one_token_routed_sum(x, range(len(w1)), top_w, lambda j, xe: mm(xe, self.fc1[0], w1[j]),
                                    lambda j, a: mm(a, self.fc2[0], w2[j]))

    def can_gather_on_device(self) -> bool:
        return bool(self.fc1)  # staged experts are not prepared anywhere yet

    def gather_on_device(self) -> None:
        """From now on a compiled one-token step gathers its experts on the device (quant.stacked)
        instead of reading their ids on the host (eager steps keep doing that: no copy there);
        experts prepared for a GPU are stacked already."""
        self._check_placed()
        if self._stacks is None:
            self._use_stacks(stack_prepared(self.fc1, self.num_experts), stack_prepared(self.fc2, self.num_experts))
        self.gathers = True

    def _use_stacks(self, fc1: StackedPrepared, fc2: StackedPrepared) -> None:
        """Hold the experts as these blocks; the per-expert Prepared are views into them."""
        self._stacks = (fc1, fc2)
        self.fc1, self.fc2 = list(fc1.experts), list(fc2.experts)

    def _check_placed(self) -> None:
        if not self.fc1:
            raise RuntimeError("these experts are staged in host memory: place the model before running it")

    def prepare_for(self, device: torch.device | str) -> None:
        """Prepare every expert for `device` (kernel layouts differ per device type).

        On a GPU straight into stacked blocks (one allocation per matrix kind, ready for
        gather_on_device); on the CPU each expert on its own, where a prepared weight may be a
        view of the stored form (int8: the checkpoint's mapped pages) that stacking would copy."""
        fc1, fc2 = _still_packed(self._packed)
        prepared = [self._prepared(fc1, device), self._prepared(fc2, device)]
        if torch.device(device).type == "cpu":
            self._stacks = None
            self.fc1, self.fc2 = (list(each) for each in prepared)
        else:
            self._use_stacks(*(stack_prepared(each, self.num_experts) for each in prepared))
        if not keeps_packed(device):
            self._packed = None
        if self.gathers:
            self.gather_on_device()  # stacks CPU experts too

    def _prepared(self, packed: dict[str, torch.Tensor], device: torch.device | str):
        """Each expert of `packed` prepared for `device`, one at a time, as they are consumed."""
        return (self.scheme.prepare(slice_packed(packed, e), device, self.dtype) for e in range(self.num_experts))

    def expert_codec(self):
        """How the offload engine moves and runs these experts (runtime.offload.codec)."""
        from .offload.codec import QuantizedExpertCodec  # offload builds on this module

        return QuantizedExpertCodec(self.scheme, *_still_packed(self._packed), self.dtype)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.fc1 + self.fc2)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, scheme={self.scheme!r}"


def keeps_packed(device: torch.device | str) -> bool:
    """Whether a quantized module prepared for `device` keeps its packed form in host memory.

    On the CPU, yes: its kernels' large-batch path reads it (Prepared.plain) and the offload
    engine builds its expert store from it. On a GPU, no: quantized while loading, the packed
    form is the whole quantized model in host RAM (13 GB for int4 Aria) that nothing reads once
    the device holds its own layout. Such a model is placed once; to move it, load it again.
    """
    return torch.device(device).type == "cpu"


def _still_packed(packed):
    if packed is None:
        raise ValueError("this quantized model was prepared for a GPU and let its host copy go; load it again "
                         "to place it elsewhere")
    return packed


@dataclass
class QuantReport:
    """Bytes per module family before and after quantization, and what was quantized."""

    before: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAMILIES, 0))
    after: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAMILIES, 0))
    quantized: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAMILIES, 0))  # weights per family
    kept: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAMILIES, 0))

    def add(self, name: str, before: int, after: int, quantized: bool) -> None:
        family = family_of(name)
        self.before[family] += before
        self.after[family] += after
        (self.quantized if quantized else self.kept)[family] += 1

    def unquantized_experts(self) -> int:
        return self.kept["routed experts"]

    def rows(self) -> list[tuple[str, int, int, str]]:
        """(family, bytes before, bytes after, 'quantized'|'kept') for every family present."""
        return [
            (f, self.before[f], self.after[f], "quantized" if self.quantized[f] and not self.kept[f] else "kept")
            for f in FAMILIES if self.before[f]
        ]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _targets(model: nn.Module, families: tuple[str, ...]) -> list[tuple[nn.Module, str, list[str]]]:
    """(parent, attribute, weight names) of every module to quantize, listed before any is swapped."""
    found = []
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            path = f"{name}.{attr}" if name else attr
            if isinstance(child, RoutedExperts):
                found.append((module, attr, [f"{path}.fc1.weight", f"{path}.fc2.weight"]))
            elif isinstance(child, nn.Linear) and is_quantized(f"{path}.weight", families):
                found.append((module, attr, [f"{path}.weight"]))
    return found


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    scheme: Scheme,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    release: Callable[[str], None] | None = None,
    families: tuple[str, ...] = QUANTIZED_FAMILIES,
    staged: bool = False,
) -> QuantReport:
    """Quantize every target of a float model in place; `release(name)` frees each source after.
    `staged`: the routed experts are left unprepared (see QuantizedRoutedExperts).

    Raises ValueError naming the first weight whose shape the scheme cannot take, before any
    weight is touched."""
    problem = first_unsupported(scheme, ((name, p.shape) for name, p in model.named_parameters()), families)
    if problem:
        raise ValueError(problem)

    def packed_from_float(name: str) -> dict[str, torch.Tensor]:
        weight = model.get_parameter(name)
        packed = scheme.quantize(to_stored_orientation(name, weight))
        if release is not None:
            release(name)
        return packed

    return install_packed(model, scheme, packed_from_float, dtype, device, report_floats=True, families=families,
                          staged=staged)


@torch.no_grad()
def install_packed(
    model: nn.Module,
    scheme: Scheme,
    get_packed: PackedGetter,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    report_floats: bool = False,
    families: tuple[str, ...] = QUANTIZED_FAMILIES,
    staged: bool = False,
) -> QuantReport:
    """Replace every target module by its quantized form built from `get_packed(weight name)`.

    Works on a meta-built model (nothing is read but the packed tensors) and on a loaded one.
    `staged`: the weights wait in host memory for the offload engine to place them; routed
    experts are then not prepared for `device` (it would be thrown away: the engine prepares
    each expert for where it ends up).
    """
    report = QuantReport()
    for parent, attr, names in _targets(model, families):
        before = {n: _nbytes(model.get_parameter(n)) for n in names}
        packed = {n: get_packed(n) for n in names}
        if isinstance(getattr(parent, attr), RoutedExperts):
            new = QuantizedRoutedExperts(scheme, packed[names[0]], packed[names[1]], None if staged else device, dtype)
        else:
            new = QuantizedLinear.from_packed(packed[names[0]], scheme, device, dtype=dtype)
            new.packed = packed[names[0]] if keeps_packed(device) else None  # what move_model prepares from
        for n in names:
            report.add(n, before[n], sum(_nbytes(t) for t in packed[n].values()), True)
        setattr(parent, attr, new)
    if report_floats:
        for name, param in model.named_parameters():
            report.add(name, _nbytes(param), _nbytes(param), False)
    return report


def move_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """`model.to(device)` that also moves quantized modules.

    Their prepared weights are kernel layouts tied to one device type (int4's CPU and CUDA
    packings differ), so `.to()` cannot move them: they are prepared again from the packed form,
    which a module placed on a GPU then lets go (keeps_packed).
    """
    device = torch.device(device)
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, QuantizedRoutedExperts) and (not child.fc1 or child.fc1[0].device != device):
                child.prepare_for(device)
            elif isinstance(child, QuantizedLinear) and child.prepared.device != device:
                packed = _still_packed(child.packed)
                moved = QuantizedLinear.from_packed(packed, child.scheme, device, dtype=child.prepared.dtype)
                moved.packed = packed if keeps_packed(device) else None
                setattr(module, attr, moved)
    return model.to(device)
