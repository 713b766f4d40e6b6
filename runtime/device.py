"""The few CUDA specifics the runtime needs, behind helpers that are synchronous no-ops on the CPU.

Offloading moves expert weights between a *host* (CPU memory) and a *device*. On CUDA a copy
runs on a side stream so it overlaps compute, reads from pinned memory so it is truly
asynchronous, and is ordered with compute by events. On the CPU (tests, CPU-only runs) the same
calls copy at once and every wait returns immediately, so one code path serves both.
"""

from __future__ import annotations

import os
import time

import torch


def as_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def free_memory(device: torch.device | str) -> int | None:
    """Bytes the device has free right now, or None where there is no separate device memory."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(as_device(device))
    return int(free)


def available_host_memory() -> int | None:
    """Bytes of CPU memory the system can still give without swapping (Linux MemAvailable), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


# Pinned allocations above this size get exactly their size (see pin_exact_sizes).
EXACT_PINNED_ABOVE_MB = 64


def pin_exact_sizes() -> None:
    """Stop PyTorch's pinned allocator rounding large allocations up to a power of two.

    Its caching host allocator rounds every pinned allocation up to a power of two
    (ATen/core/CachingHostAllocator.h) unless `pinned_max_round_threshold_mb` says otherwise, and
    the default is no limit: a layer's 1.5 GB of bf16 experts would pin 2 GB, 13 GB more than
    planned over Aria's 28 layers. A threshold the user set (PYTORCH_ALLOC_CONF) is kept.
    """
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    set_ = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if get is None or set_ is None:
        return
    current = get()
    if "pinned_max_round_threshold_mb" in current:
        return
    # Setting replaces the whole configuration (unnamed keys return to their defaults), so the
    # user's other settings are passed along.
    ours = f"pinned_max_round_threshold_mb:{EXACT_PINNED_ABOVE_MB}"
    set_(f"{current},{ours}" if current else ours)


def host_buffer(nbytes: int, rows: int = 1, pin: bool = False) -> torch.Tensor:
    """A [rows, nbytes] uint8 host buffer, page-locked when `pin` and CUDA is present.

    Pinned memory is what lets one non-blocking copy move a whole row to the device without a
    staging copy; without CUDA there is nothing to pin for.
    """
    pin = pin and torch.cuda.is_available()
    if pin:
        pin_exact_sizes()
    return torch.empty((rows, nbytes), dtype=torch.uint8, pin_memory=pin)


def synchronize(device: torch.device | str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(as_device(device))


class Marker:
    """A point in the device's compute stream: 'work enqueued so far'. None-like on the CPU."""

    def __init__(self, device: torch.device):
        self.event = None
        if device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(device))


class Ready:
    """Completion of one asynchronous copy. `wait()` blocks the host until done."""

    def __init__(self, event=None):
        self.event = event

    def wait(self) -> float:
        """Block until the copy has landed; returns the seconds the host spent waiting."""
        if self.event is None or self.event.query():
            return 0.0
        start = time.perf_counter()
        self.event.synchronize()
        return time.perf_counter() - start


class CopyStream:
    """Host-to-device copies on a side stream (CUDA) or done immediately (CPU)."""

    def __init__(self, device: torch.device | str):
        self.device = as_device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Marker | None = None) -> Ready:
        """Start `dst.copy_(src)`; it begins only once the compute work before `after` is done.

        `after` marks the last compute that read `dst`'s old contents, so a slot is never
        overwritten under a kernel still reading it, without waiting for unrelated compute.
        """
        if self.stream is None:
            dst.copy_(src)
            return Ready()
        if after is not None and after.event is not None:
            self.stream.wait_event(after.event)
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return Ready(done)


def timed(fn, device: torch.device | str, reps: int) -> float:
    """Median wall seconds of `fn()` over `reps` runs (after one warm-up), device work included."""
    fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]
