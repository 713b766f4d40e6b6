"""Peak memory and throughput of `aria quantize` (runtime.convert) on a multi-GB synthetic checkpoint.

    python bench/quantize_peak_rss.py [--scheme int4] [--layers 2] [--keep DIR]

Writes an Aria-width checkpoint (hidden 2560, 64 experts of width 1664, bf16: ~1.7 GB a layer)
in a subprocess, quantizes it in a fresh subprocess and prints peak RSS against the issue's bound
(2.5 GB + the largest single source tensor), the MB/s read, and the output size. The same
streaming path serves on-the-fly `--quant` loading. Not a test: numbers depend on the machine.
Writing and converting run in separate processes because Linux carries ru_maxrss across fork.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from load_peak_rss import _peak_rss_bytes  # same folder: the one RSS reader the benches share

ARIA_WIDTH = {
    "hidden_size": 2560, "num_attention_heads": 20, "num_key_value_heads": 20, "moe_intermediate_size": 1664,
    "moe_num_experts": 64, "moe_topk": 6, "vocab_size": 16384,
    "vision_hidden_size": 256, "vision_intermediate_size": 512, "vision_num_attention_heads": 4,
}


def write(out_dir: str, layers: int) -> None:
    import torch

    from runtime.tiny_checkpoint import tiny_config, write_tiny_checkpoint

    config = tiny_config(num_hidden_layers=layers, **ARIA_WIDTH)
    write_tiny_checkpoint(out_dir, "c1", config=config, max_shard_bytes=1 << 30, dtype=torch.bfloat16,
                          overwrite=True)


def convert(src: str, out: str, scheme: str) -> None:
    from quant import get_scheme
    from runtime.checkpoint import open_checkpoint
    from runtime.convert import quantize_checkpoint

    ckpt = open_checkpoint(src)
    largest = max(ckpt.dtype(n).itemsize * math.prod(ckpt.shape(n)) for n in ckpt.names())
    baseline = _peak_rss_bytes()
    result = quantize_checkpoint(src, out, get_scheme(scheme), force=True)
    out_bytes = sum(p.stat().st_size for p in Path(out).glob("*.safetensors"))
    print(json.dumps({
        "source_bytes": result.source_bytes, "largest_tensor": largest, "baseline": baseline,
        "peak": _peak_rss_bytes(), "seconds": result.seconds, "mb_per_s": result.mb_per_s, "out_bytes": out_bytes,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", default="int4", choices=["int4", "int8", "nf4"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--keep", help="reuse/keep the synthetic checkpoint in this directory")
    parser.add_argument("--write-to", help=argparse.SUPPRESS)
    parser.add_argument("--convert", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_to:
        return write(args.write_to, args.layers)
    if args.convert:
        return convert(*args.convert, args.scheme)

    work = Path(args.keep or tempfile.mkdtemp(prefix="aria-quant-bench-"))
    src, out = work / "src", work / f"out-{args.scheme}"
    me = [sys.executable, __file__, "--scheme", args.scheme, "--layers", str(args.layers)]
    if not (src / "config.json").exists():
        started = time.perf_counter()
        subprocess.run([*me, "--write-to", str(src)], check=True)
        print(f"wrote the synthetic checkpoint in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    run = subprocess.run([*me, "--convert", str(src), str(out)], check=True, capture_output=True, text=True)
    r = json.loads(run.stdout.strip().splitlines()[-1])
    gb = 1e9
    bound = 2.5 * gb + r["largest_tensor"]
    print(f"scheme {args.scheme}: source {r['source_bytes'] / gb:.2f} GB -> {r['out_bytes'] / gb:.2f} GB "
          f"in {r['seconds']:.1f} s ({r['mb_per_s']:.0f} MB/s read)")
    print(f"peak RSS {r['peak'] / gb:.2f} GB (interpreter + torch baseline {r['baseline'] / gb:.2f} GB); "
          f"bound 2.5 GB + largest tensor {r['largest_tensor'] / gb:.2f} GB = {bound / gb:.2f} GB; "
          f"peak / bound = {r['peak'] / bound:.2f}")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
