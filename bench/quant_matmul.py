"""CPU matmul time of each weight format on Aria's routed-expert shapes (a benchmark, not a test).

    python bench/quant_matmul.py [--repeats 50] [--threads N]

For a fc1-shaped (2560 -> 3328) and a fc2-shaped (1664 -> 2560) weight, at batch 1 (decode) and
batch 64 (prefill chunk), times y = x @ W.T with W in bfloat16, float32, int8, int4 and nf4
(quantized formats go through quant's prepare/matmul, computing in bfloat16). Prints the median
time and the ratio to the bfloat16 time measured in the same run (below 1 = faster than bf16).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from quant import get_scheme

SHAPES = {"fc1 2560->3328": (3328, 2560), "fc2 1664->2560": (2560, 1664)}
BATCHES = (1, 64)
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


def bench_shape(out_features: int, in_features: int, repeats: int) -> list[tuple[int, str, float]]:
    weight = torch.randn(out_features, in_features) / in_features**0.5
    weight_bf16 = weight.bfloat16()
    prepared = {}
    for name in SCHEMES:
        scheme = get_scheme(name)
        prepared[name] = (scheme, scheme.prepare(scheme.quantize(weight), "cpu", torch.bfloat16))
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, in_features)
        x_bf16 = x.bfloat16()
        calls = {
            "bf16": partial(F.linear, x_bf16, weight_bf16),
            "float32": partial(F.linear, x, weight),
            **{name: partial(scheme.matmul, x_bf16, prep) for name, (scheme, prep) in prepared.items()},
        }
        rows += [(batch, fmt, ms) for fmt, ms in median_ms(calls, repeats).items()]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"{'weight':<16} {'batch':>5} {'format':<8} {'ms':>9} {'x bf16':>7}")
    for label, (out_features, in_features) in SHAPES.items():
        rows = bench_shape(out_features, in_features, args.repeats)
        bf16_ms = {batch: ms for batch, fmt, ms in rows if fmt == "bf16"}
        for batch, fmt, ms in rows:
            print(f"{label:<16} {batch:>5} {fmt:<8} {ms:>9.3f} {ms / bf16_ms[batch]:>7.2f}")


if __name__ == "__main__":
    main()
