"""scripts/train_demo.py still makes the model that ships: a 3-step run, checked against the files
in runtime/demo_model/ (the reference: what the full run wrote)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from runtime.demo import DEMO_MODEL_DIR

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_demo.py"


def tensor_specs(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    with safe_open(str(path), "pt") as f:
        return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
                for name in f.keys()}  # noqa: SIM118 - safe_open is not a mapping


def test_a_short_run_writes_the_shipped_files_and_weights_of_the_same_shapes(tmp_path):
    out = tmp_path / "demo"
    # A subprocess, as users run it (the picture workers are spawned processes).
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--pictures", "64", "--steps", "3",
                           "--monitor", "8"], check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    shipped = {p.relative_to(DEMO_MODEL_DIR) for p in DEMO_MODEL_DIR.rglob("*") if p.is_file()}
    written = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    assert written == shipped
    # Fixed seeds: the tokenizer, configs and example pictures come out byte for byte.
    for name in sorted(shipped - {Path("model.safetensors")}):
        assert (out / name).read_bytes() == (DEMO_MODEL_DIR / name).read_bytes(), name
    # The weights differ (3 steps, not 3000) but are the same tensors.
    assert tensor_specs(out / "model.safetensors") == tensor_specs(DEMO_MODEL_DIR / "model.safetensors")
