"""CPU matmul time of each weight format on Aria's routed-expert shapes (a benchmark, not a test).

    python bench/quant_matmul.py [--repeats 20] [--threads N]

For a fc1-shaped (2560 -> 3328) and a fc2-shaped (1664 -> 2560) weight, from batch 1 (decode)
to 256 (a long prefill's share of one expert), times y = x @ W.T with W in bfloat16, float32,
int8, int4 and nf4 (quantized formats go through quant's prepare/matmul, computing in bfloat16).
Each quantized format is timed three ways: as `matmul` chooses, forced onto its quantized
kernel ("gemv"), and forced onto dequantize-then-GEMM ("gemm"); the two forced columns show
where the scheme's cpu_gemm_min_rows should sit on this machine. Times are medians in ms;
ratios are to the bfloat16 time measured in the same run (below 1 = faster than bf16).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F

from quant import get_scheme

SHAPES = {"fc1 2560->3328": (3328, 2560), "fc2 1664->2560": (2560, 1664)}
BATCHES = (1, 8, 16, 32, 64, 128, 256)
SCHEMES = ("int8", "int4", "nf4")


def median_ms(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms per call; formats are timed round-robin so load changes hit all of them alike."""
    for fn in calls.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


@contextmanager
def forced_path(name: str, path: str):
    """Make the scheme's CPU matmul take one path whatever the batch ("gemv" or "gemm")."""
    scheme_class = type(get_scheme(name))
    saved = scheme_class.cpu_gemm_min_rows
    scheme_class.cpu_gemm_min_rows = 10**9 if path == "gemv" else 0
    try:
        yield
    finally:
        scheme_class.cpu_gemm_min_rows = saved


def timed_under(scheme: str, path: str, fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        with forced_path(scheme, path):
            return fn()

    return call


def bench_shape(out_features: int, in_features: int, repeats: int) -> dict[int, dict[str, float]]:
    """batch -> format -> median ms."""
    weight = torch.randn(out_features, in_features) / in_features**0.5
    weight_bf16 = weight.bfloat16()
    prepared = {}
    for name in SCHEMES:
        scheme = get_scheme(name)
        prepared[name] = (scheme, scheme.prepare(scheme.quantize(weight), "cpu", torch.bfloat16))
    table = {}
    for batch in BATCHES:
        x = torch.randn(batch, in_features)
        x_bf16 = x.bfloat16()
        calls = {"bf16": partial(F.linear, x_bf16, weight_bf16), "float32": partial(F.linear, x, weight)}
        for name, (scheme, prep) in prepared.items():
            matmul = partial(scheme.matmul, x_bf16, prep)
            calls[name] = matmul
            for path in ("gemv", "gemm"):
                calls[f"{name} {path}"] = timed_under(name, path, matmul)
        table[batch] = median_ms(calls, repeats)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}"
    )
    thresholds = {name: get_scheme(name).cpu_gemm_min_rows for name in SCHEMES}
    print("cpu_gemm_min_rows: " + ", ".join(f"{name} {rows}" for name, rows in thresholds.items()))
    for label, (out_features, in_features) in SHAPES.items():
        table = bench_shape(out_features, in_features, args.repeats)
        formats = [f for f in table[BATCHES[0]] if f != "bf16"]
        print(f"\n{label}: bf16 ms, then each format's time / bf16")
        print(f"{'batch':>5} {'bf16 ms':>8} " + " ".join(f"{f:>9}" for f in formats))
        for batch, times in table.items():
            ratios = " ".join(f"{times[f] / times['bf16']:>9.2f}" for f in formats)
            print(f"{batch:>5} {times['bf16']:>8.3f} {ratios}")


if __name__ == "__main__":
    main()
