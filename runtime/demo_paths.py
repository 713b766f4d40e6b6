"""Where the embedded demo model lives (no torch import: the CLI resolves `demo` from this)."""

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"
DEMO_EXAMPLES_DIR = DEMO_MODEL_DIR / "examples"
