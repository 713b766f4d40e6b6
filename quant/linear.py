"""QuantizedLinear: an nn.Linear stand-in whose weight lives in a scheme's prepared kernel layout."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Prepared, Scheme


class QuantizedLinear(nn.Module):
    """y = x @ W.T (+ bias) with W held as ``scheme.prepare(...)`` output.

    The prepared weight is a plain attribute, not a parameter or buffer: it is device-specific,
    so ``state_dict`` never contains it and ``.to()`` does not move it. To change device, build
    the module again with ``from_packed``. Only the optional bias is a (non-persistent) buffer.
    """

    def __init__(self, scheme: Scheme, prepared: Prepared, bias: Tensor | None = None):
        super().__init__()
        if bias is not None and bias.shape != (prepared.out_features,):
            raise ValueError(f"bias should have shape [{prepared.out_features}], got {list(bias.shape)}")
        self.scheme = scheme
        self.prepared = prepared
        self.in_features = prepared.in_features
        self.out_features = prepared.out_features
        self.register_buffer(
            "bias", None if bias is None else bias.detach().to(prepared.device), persistent=False
        )

    @classmethod
    def from_packed(
        cls,
        packed: dict[str, Tensor],
        scheme: Scheme,
        device: torch.device | str | None = None,
        bias: Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> QuantizedLinear:
        """From the stored plain tensors (``scheme.quantize`` output), prepared once for ``device``."""
        return cls(scheme, scheme.prepare(packed, device, dtype), bias)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        scheme: Scheme,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> QuantizedLinear:
        """Quantize an existing nn.Linear (raises ValueError if its shape does not fit the scheme)."""
        packed = scheme.quantize(linear.weight.detach())
        device = device if device is not None else linear.weight.device
        return cls.from_packed(packed, scheme, device, linear.bias, dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = self.scheme.matmul(x, self.prepared)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scheme={self.scheme!r}, device={self.prepared.device}"
        )
