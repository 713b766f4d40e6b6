"""The contract every quantization scheme follows, and the one place that dispatches by device.

A scheme turns a float weight [..., out, in] into a *packed* dict of plain tensors (what goes on
disk), back into floats (``dequantize``), and into a *prepared* form laid out for one device's
kernel (``prepare``), which ``matmul`` then uses. Leading dims are batch dims (grouped routed
experts are [E, out, in]); every packed tensor carries the same leading dims, so one expert is
``slice_packed(packed, e)`` and costs nothing.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

# (shape, dtype) of each packed tensor, keyed by the suffix the converter appends to the weight name.
PackedSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]
# Bytes kernel inputs start on: kernels read whole vectors (int8's CPU one crashes off 16 or 32),
# and PyTorch's own CPU allocations are aligned so.
KERNEL_ALIGNMENT = 64
# Float32 bytes of one weight quantized per step (Scheme.quantize): at 2 MiB the intermediates
# stay in a core's L2, 1.5-3x faster than whole Aria expert matrices (2 cores, 2 MiB L2 each).
QUANTIZE_CHUNK_BYTES = 2 << 20
# A kernel takes a contiguous 2-D activation in the prepared compute dtype and returns [rows, out].
Kernel = Callable[[Tensor, dict[str, Tensor]], Tensor]


@dataclass(frozen=True)
class Prepared:
    """One 2-D weight converted once into the layout a specific kernel wants."""

    scheme: str
    out_features: int
    in_features: int
    device: torch.device
    dtype: torch.dtype  # activations are cast to this before the kernel runs
    kernel: Kernel = field(repr=False)
    tensors: dict[str, Tensor] = field(repr=False)
    # On the CPU, the stored form itself (views, not copies) for the large-batch GEMM path; not
    # part of the kernel layout, so not counted in nbytes nor copied by whoever moves `tensors`.
    plain: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def slice_packed(packed: dict[str, Tensor], index: int | slice) -> dict[str, Tensor]:
    """Select along the leading (expert) dim of every packed tensor; views, no copies."""
    return {suffix: tensor[index] for suffix, tensor in packed.items()}


class Scheme(ABC):
    """A weight-only quantization scheme. Subclasses implement the 2-D pieces below."""

    name: str
    # Names of the packed tensors, the [..., out, *] quantized data first.
    suffixes: tuple[str, ...]
    # From this many activation rows on (a prefill's share of one expert), a CPU matmul
    # dequantizes the weight once and runs the compute dtype's GEMM (`_cpu_gemm`): the quantized
    # kernels are gemv-like, their cost grows with every row, a GEMM's barely. Each scheme sets
    # it from bench/quant_matmul.py's crossover.
    cpu_gemm_min_rows: int
    # True when prepare gives the same tensors (bytes) for the CPU and for CUDA and only the
    # kernel differs: one copy of a prepared weight then serves both (the offload store's rows).
    same_layout_on_every_device: bool = False
    # True when the CUDA product dequantizes the whole weight into the compute dtype first (for
    # some or all batch sizes): the planner reserves the largest such matrix.
    cuda_dequantizes: bool = False

    # ----- what subclasses provide -------------------------------------------------------------

    @abstractmethod
    def metadata(self) -> dict[str, int | str]:
        """Everything a config needs to rebuild this scheme with ``scheme_from_metadata``."""

    @abstractmethod
    def _shape_problem(self, out_features: int, in_features: int) -> str | None:
        """Why a [out, in] weight cannot use this scheme's kernels, or None if it can."""

    @abstractmethod
    def _packed_spec_2d(self, out_features: int, in_features: int) -> PackedSpec: ...

    @abstractmethod
    def _weight_shape_2d(self, packed: dict[str, Tensor]) -> tuple[int, int]:
        """[out, in] of the weight a 2-D (or batched, read from the last dims) packed dict holds."""

    @abstractmethod
    def _quantize_2d(self, weight: Tensor) -> dict[str, Tensor]:
        """Quantize one float32 [out, in] weight (already validated)."""

    @abstractmethod
    def _dequantize_2d(self, packed: dict[str, Tensor]) -> Tensor:
        """float32 [out, in] from one 2-D packed dict."""

    @abstractmethod
    def _prepare_cpu(
        self, packed: dict[str, Tensor], dtype: torch.dtype
    ) -> tuple[dict[str, Tensor], Kernel]: ...

    @abstractmethod
    def _prepare_cuda(
        self, packed: dict[str, Tensor], dtype: torch.dtype
    ) -> tuple[dict[str, Tensor], Kernel]:
        """``packed`` is already on the target CUDA device."""

    def device_problem(self, device: torch.device | str, dtype: torch.dtype) -> str | None:
        """Why this scheme's kernels cannot run on `device` computing in `dtype`, or None."""
        return None

    @abstractmethod
    def _cpu_gemm(self, x: Tensor, packed: dict[str, Tensor]) -> Tensor:
        """x @ W.T for a large CPU batch x (in the compute dtype) from the stored 2-D form."""

    def plain_from_cpu_tensors(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The stored form, where a CPU kernel layout still is it (usable by `_cpu_gemm`), else {}.

        For holders of prepared tensors alone, e.g. the offload store's host rows."""
        return {}

    # ----- shapes and sizes --------------------------------------------------------------------

    def why_unsupported(self, shape: tuple[int, ...] | torch.Size) -> str | None:
        """None if a weight of this [..., out, in] shape can be quantized, else the reason.

        The rules are the union of every device's kernel constraints, so a weight that quantizes
        runs everywhere. Callers (the converter) skip such modules rather than catch errors.
        """
        if len(shape) < 2:
            return f"{self.name} quantizes matrices [..., out, in], got shape {tuple(shape)}"
        return self._shape_problem(int(shape[-2]), int(shape[-1]))

    def packed_spec(self, shape: tuple[int, ...] | torch.Size) -> PackedSpec:
        """Shape and dtype of every packed tensor for a weight of this shape (for strict loading)."""
        self._check_shape(shape)
        lead = tuple(int(d) for d in shape[:-2])
        spec = self._packed_spec_2d(int(shape[-2]), int(shape[-1]))
        return {suffix: (lead + s, dtype) for suffix, (s, dtype) in spec.items()}

    def packed_nbytes(self, shape: tuple[int, ...] | torch.Size) -> int:
        """Exact bytes the packed form of a weight of this shape occupies (for the planner)."""
        return sum(
            math.prod(s) * torch.empty((), dtype=dtype).element_size()
            for s, dtype in self.packed_spec(shape).values()
        )

    def weight_shape(self, packed: dict[str, Tensor]) -> tuple[int, ...]:
        """[..., out, in] of the weight stored in ``packed``; checks every tensor's shape and dtype."""
        missing = set(self.suffixes) - set(packed)
        extra = set(packed) - set(self.suffixes)
        if missing or extra:
            raise ValueError(
                f"{self.name} packed weight needs tensors {sorted(self.suffixes)}, got {sorted(packed)}"
            )
        out_features, in_features = self._weight_shape_2d(packed)
        lead = tuple(packed[self.suffixes[0]].shape[:-2])
        shape = lead + (out_features, in_features)
        for suffix, (want_shape, want_dtype) in self.packed_spec(shape).items():
            got = packed[suffix]
            if tuple(got.shape) != want_shape or got.dtype != want_dtype:
                raise ValueError(
                    f"{self.name} packed tensor '{suffix}' should be {want_dtype} {list(want_shape)}, "
                    f"got {got.dtype} {list(got.shape)}"
                )
        return shape

    # ----- quantize / dequantize ---------------------------------------------------------------

    @torch.no_grad()
    def quantize(self, weight: Tensor) -> dict[str, Tensor]:
        """Packed plain tensors for a float weight [..., out, in], on the weight's device.

        Works one 2-D slice at a time so a grouped [E, out, in] tensor never needs a full
        float32 copy. Raises ValueError if the shape does not fit or the weight is not finite.
        """
        if not weight.is_floating_point():
            raise ValueError(f"{self.name} quantizes float weights, got {weight.dtype}")
        self._check_shape(weight.shape)
        spec = self.packed_spec(weight.shape)
        out = {
            suffix: torch.empty(s, dtype=dtype, device=weight.device) for suffix, (s, dtype) in spec.items()
        }
        flat_out = {suffix: t.view(-1, *t.shape[len(weight.shape) - 2 :]) for suffix, t in out.items()}
        # Every scheme quantizes each output row on its own: a few rows at a time, the float32
        # intermediates stay in cache.
        rows = max(1, QUANTIZE_CHUNK_BYTES // (4 * weight.shape[-1]))
        for i, w in enumerate(weight.reshape(-1, *weight.shape[-2:])):
            for start in range(0, w.shape[0], rows):
                # Checkpoints may hand over transposed views (HF grouped experts are [E, in, out]):
                # reductions over such strides are ~40x slower, and a float32 view would not be
                # copied by a plain .to(float32), so the copy is asked for whenever not contiguous.
                chunk = w[start : start + rows]
                w32 = chunk.to(torch.float32, memory_format=torch.contiguous_format,
                               copy=not chunk.is_contiguous())
                # One float64 sum is NaN or infinite exactly when some weight is (finite float32
                # values cannot overflow it), at half the cost of isfinite().all().
                if not torch.isfinite(w32.sum(dtype=torch.float64)):
                    raise ValueError(f"cannot quantize a weight with NaN or infinite values (slice {i})")
                for suffix, tensor in self._quantize_2d(w32).items():
                    flat_out[suffix][i, start : start + rows].copy_(tensor)
        return out

    @torch.no_grad()
    def dequantize(self, packed: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight [..., out, in] that the packed form stands for."""
        shape = self.weight_shape(packed)
        device = packed[self.suffixes[0]].device
        result = torch.empty(shape, dtype=dtype, device=device)
        flat = {suffix: t.reshape(-1, *t.shape[len(shape) - 2 :]) for suffix, t in packed.items()}
        for i, w in enumerate(result.view(-1, *shape[-2:])):
            w.copy_(self._dequantize_2d(slice_packed(flat, i)))
        return result

    # ----- kernels -----------------------------------------------------------------------------

    @torch.no_grad()
    def prepare(
        self,
        packed: dict[str, Tensor],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> Prepared:
        """Convert one 2-D packed weight, once, into the kernel layout for ``device``.

        ``dtype`` is the compute dtype: activations are cast to it and the kernel runs in it
        (bfloat16 is the fast path everywhere; some kernels also take float16/float32).
        The result is only valid on that device type: moving to another device means preparing again.
        """
        shape = self.weight_shape(packed)
        if len(shape) != 2:
            raise ValueError(
                f"prepare takes one 2-D weight, got a batch {list(shape)}; use slice_packed(packed, i)"
            )
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"compute dtype must be bfloat16, float16 or float32, got {dtype}")
        device = torch.device(device) if device is not None else packed[self.suffixes[0]].device
        packed = {suffix: t.to(device) for suffix, t in packed.items()}
        plain = {}
        if device.type == "cuda":
            tensors, kernel = self._prepare_cuda(packed, dtype)
        elif device.type == "cpu":
            tensors, kernel = self._prepare_cpu(packed, dtype)
            plain = packed  # views of what the caller holds (an mmap'd checkpoint, the experts' packed form)
        else:
            raise ValueError(f"{self.name} has kernels for cpu and cuda, not {device.type}")
        return Prepared(self.name, shape[0], shape[1], device, dtype, kernel, tensors, plain)

    def matmul(self, x: Tensor, prepared: Prepared, kernel_tensors: dict[str, Tensor] | None = None) -> Tensor:
        """x [..., in] (any float dtype) @ weight.T -> [..., out] in x's dtype.

        `kernel_tensors`: to use instead of prepared's own, laid out alike (another expert's,
        gathered on the device); the product then always takes the kernel."""
        # A decode step makes ~20 of these calls per layer, each a few microseconds of kernel:
        # no-op casts and copies are skipped rather than dispatched.
        if prepared.scheme != self.name:
            raise ValueError(f"weight was prepared for {prepared.scheme}, not {self.name}")
        if x.shape[-1] != prepared.in_features:
            raise ValueError(
                f"input has {x.shape[-1]} features but the weight expects {prepared.in_features}"
            )
        if x.device.type != prepared.device.type:
            raise ValueError(
                f"input is on {x.device} but the weight was prepared for {prepared.device}; prepare it again"
            )
        lead = x.shape[:-1]
        rows = x.reshape(-1, prepared.in_features)
        if rows.shape[0] == 0:
            return x.new_empty(*lead, prepared.out_features)
        if rows.dtype != prepared.dtype:
            rows = rows.to(prepared.dtype)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        if kernel_tensors is None and prepared.plain and rows.shape[0] >= self.cpu_gemm_min_rows:
            y = self._cpu_gemm(rows, prepared.plain)
        else:
            y = prepared.kernel(rows, prepared.tensors if kernel_tensors is None else kernel_tensors)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if len(lead) == 1 else y.view(*lead, prepared.out_features)

    # ----- helpers -----------------------------------------------------------------------------

    def _check_shape(self, shape: tuple[int, ...] | torch.Size) -> None:
        problem = self.why_unsupported(shape)
        if problem:
            raise ValueError(problem)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.metadata().items() if k != "scheme")
        return f"{self.name}({options})"
