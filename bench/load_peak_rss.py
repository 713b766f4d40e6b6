"""Peak memory of loading a checkpoint: writes a few-hundred-MB random Aria-shaped checkpoint,
loads it into a meta-built model in a fresh subprocess and prints peak RSS against its size.

    python bench/load_peak_rss.py [--layout c1] [--dtype bfloat16] [--load-dtype same|float32|bfloat16]

Writing and loading each run in their own subprocess, and this parent imports nothing heavy:
Linux carries the peak RSS (ru_maxrss) of a process across fork/exec, so a loader forked from
the process that built the random weights would report that process's peak.
The loader touches every weight after loading (as a forward pass would), so the peak includes
the pages actually read; the baseline (interpreter + torch + meta model) is measured just
before the load and subtracted. Target: (peak - baseline) / checkpoint size <= 1.3.
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Aria's proportions, shrunk: routed experts dominate the bytes as in the real model.
BENCH_OVERRIDES = {
    "hidden_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 8, "num_hidden_layers": 4,
    "vocab_size": 16384, "moe_intermediate_size": 512, "moe_num_experts": 16, "moe_topk": 2,
    "vision_hidden_size": 256, "vision_intermediate_size": 512, "vision_num_attention_heads": 4,
}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def write(out_dir: str, layout: str, dtype: str, shard_mb: int) -> None:
    import torch

    from runtime.tiny_checkpoint import tiny_config, write_tiny_checkpoint

    write_tiny_checkpoint(out_dir, layout, config=tiny_config(**BENCH_OVERRIDES),
                          max_shard_bytes=shard_mb * 2**20, dtype=getattr(torch, dtype))


def load(ckpt_dir: str, load_dtype: str) -> None:
    import torch

    from runtime.checkpoint import load_weights
    from runtime.config import load_config
    from runtime.model import build_model

    model = build_model(load_config(ckpt_dir))
    dtype = None if load_dtype == "same" else getattr(torch, load_dtype)
    baseline = _peak_rss_bytes()
    start = time.perf_counter()
    ckpt = load_weights(model, ckpt_dir, dtype=dtype)
    load_seconds = time.perf_counter() - start
    after_load = _peak_rss_bytes()
    # Touch every page; a plain sum allocates nothing the size of a weight.
    checksum = sum(float(p.sum()) for p in model.state_dict().values())
    print(json.dumps({
        "checkpoint_bytes": ckpt.nbytes, "loaded_bytes": sum(p.nbytes for p in model.state_dict().values()), "baseline": baseline, "after_load": after_load, "peak": _peak_rss_bytes(),
        "load_seconds": load_seconds, "checksum": checksum,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="c1")
    parser.add_argument("--dtype", default="bfloat16", help="stored dtype")
    parser.add_argument("--load-dtype", default="same", help="dtype to load as (same = stored)")
    parser.add_argument("--shard-mb", type=int, default=100)
    parser.add_argument("--write-to", help=argparse.SUPPRESS)
    parser.add_argument("--load-from", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_to:
        return write(args.write_to, args.layout, args.dtype, args.shard_mb)
    if args.load_from:
        return load(args.load_from, args.load_dtype)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--write-to", tmp, "--layout", args.layout, "--dtype", args.dtype,
                        "--shard-mb", str(args.shard_mb)], check=True)
        on_disk = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
        print(f"wrote {on_disk / 2**20:.0f} MiB ({args.layout}, {args.dtype}) in {time.perf_counter() - start:.1f}s")
        out = subprocess.run(
            [sys.executable, __file__, "--load-from", tmp, "--load-dtype", args.load_dtype],
            check=True, capture_output=True, text=True,
        )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    size, base = r["checkpoint_bytes"], r["baseline"]
    mib = 2**20
    print(f"load as {args.load_dtype}: {r['load_seconds']:.2f}s")
    print(f"baseline RSS {base / mib:.0f} MiB; peak after load {r['after_load'] / mib:.0f} MiB; "
          f"peak after touching all weights {r['peak'] / mib:.0f} MiB")
    print(f"(peak - baseline) / checkpoint size = {(r['peak'] - base) / size:.2f}  "
          f"(after load only: {(r['after_load'] - base) / size:.2f}; peak / size = {r['peak'] / size:.2f})")
    print(f"(peak - baseline) / loaded weights ({r['loaded_bytes'] / mib:.0f} MiB) = "
          f"{(r['peak'] - base) / r['loaded_bytes']:.2f}")


if __name__ == "__main__":
    main()
