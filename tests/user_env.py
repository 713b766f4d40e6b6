"""Keep the developer's own settings and caches out of CLI tests."""

from __future__ import annotations

import os
from pathlib import Path


def isolate_user_env(monkeypatch, home: Path) -> Path:
    """No ARIA_* variable, Hub offline/endpoint/cache override or user config reaches the test;
    the HF cache and aria's config and data directories live under `home`."""
    for var in list(os.environ):
        if var.startswith("ARIA_") or var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_HUB_CACHE",
                                              "HUGGINGFACE_HUB_CACHE"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "cfg"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    return home
