"""Serving a miss: fetch the expert to the device, or compute it on the host and send back the
small activation. Chosen per miss from costs measured at start-up on this machine.

fetch: copy the expert's row (bytes / PCIe bandwidth) then run it on the device.
cpu:   run it on the host (its weights stream from CPU memory) and move the tokens' activations
       both ways. Cheap for a decoded token, expensive for a prefill's hundreds of tokens, so
       decode tends to compute on the CPU and prefill to fetch each expert once; where the
       crossover lies depends on the machine, which is why it is measured, not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..device import CopyStream, timed
from .codec import ExpertCodec
from .host_store import HostStore

FETCH, CPU = "fetch", "cpu"
MODES = ("auto", FETCH, CPU)
# Token counts the linear cost fits are measured at.
_SMALL, _LARGE = 1, 32


@dataclass(frozen=True)
class Costs:
    """Seconds on this machine. Compute costs are a + b * tokens."""

    fetch: float  # copy one expert host -> device
    device: tuple[float, float]  # run one expert on the device
    host: tuple[float, float]  # run one expert on the host
    activation: float  # move one token's activations to the host and the result back

    def fetch_cost(self, tokens: int) -> float:
        return self.fetch + self.device[0] + self.device[1] * tokens

    def cpu_cost(self, tokens: int) -> float:
        return self.host[0] + (self.host[1] + self.activation) * tokens


class MissPolicy:
    """`auto` picks the cheaper way per miss; `fetch` and `cpu` force one (for tests and flags)."""

    def __init__(self, mode: str = "auto", costs: Costs | None = None):
        if mode not in MODES:
            raise ValueError(f"miss policy must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "auto" and costs is None:
            raise ValueError("the auto miss policy needs measured costs")
        self.mode, self.costs = mode, costs

    def serve(self, tokens: int) -> str:
        """How to serve a missed expert routed `tokens` tokens this step."""
        if self.mode != "auto":
            return self.mode
        return FETCH if self.costs.fetch_cost(tokens) <= self.costs.cpu_cost(tokens) else CPU


def _linear_fit(t_small: float, t_large: float) -> tuple[float, float]:
    per_token = max(0.0, (t_large - t_small) / (_LARGE - _SMALL))
    return max(0.0, t_small - per_token * _SMALL), per_token


def measure_costs(
    codec: ExpertCodec,
    store: HostStore,
    scratch: torch.Tensor,
    copier: CopyStream,
    device: torch.device,
    host: torch.device,
    hidden_size: int,
    dtype: torch.dtype,
    reps: int = 5,
) -> Costs:
    """Time, on expert 0 of `store`, a copy into the device row `scratch` and the expert on
    either side at 1 and 32 tokens. Takes milliseconds; run once at start-up."""
    row = store.row(0)
    fetch = timed(lambda: copier.copy(scratch[: row.numel()], row).wait(), device, reps)
    on_device = store.layout.views(scratch)
    on_host = store.host_payload(0)

    def run(tensors, where, n):
        x = torch.randn(n, hidden_size, dtype=dtype, device=where)
        return timed(lambda: codec.compute(tensors, x), where, reps)

    device_cost = _linear_fit(run(on_device, device, _SMALL), run(on_device, device, _LARGE))
    host_cost = _linear_fit(run(on_host, host, _SMALL), run(on_host, host, _LARGE))
    x = torch.randn(_LARGE, hidden_size, dtype=dtype, device=device)
    activation = timed(lambda: x.to(host).to(device), device, reps) / _LARGE
    return Costs(fetch, device_cost, host_cost, activation)
