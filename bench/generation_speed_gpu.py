"""bench/generation_speed.py on a GPU: the same rows and ratios, the device synchronised at each start.

    python bench/generation_speed_gpu.py                       # mid-size, bf16, eager + compiled decode
    python bench/generation_speed_gpu.py --config demo --dtypes bfloat16 float32

Adds the peak GPU memory (torch.cuda.max_memory_allocated) to each row. Compiled decode on CUDA
uses CUDA graphs (torch.compile mode "reduce-overhead"); its compile time is reported apart.
Exits with a note when no CUDA device is present: nothing here is needed by the tests.
"""

from __future__ import annotations

import subprocess
import sys

import generation_speed


def main() -> int:
    # Ask a child: importing torch here would raise the peak RSS every worker inherits.
    probe = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"
    if subprocess.run([sys.executable, "-c", probe], check=False).returncode != 0:
        print("no CUDA device here; bench/generation_speed.py measures the CPU")
        return 0
    argv = sys.argv[1:]
    # On a GPU the interesting rows are bf16 (what users run) and the compiled decode.
    defaults = ([] if "--dtypes" in argv else ["--dtypes", "bfloat16"]) + ([] if "--compile" in argv else ["--compile"])
    sys.argv = [generation_speed.__file__, "--device", "cuda", *defaults, *argv]
    generation_speed.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
