"""Keep the developer's own settings and caches out of CLI tests."""

from __future__ import annotations

import os
from pathlib import Path

# Variables of the Hub library that would point a test at the developer's cache or network.
_HUB_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")


def _foreign(var: str) -> bool:
    return var.startswith("ARIA_") or var in _HUB_VARIABLES


def _user_dirs(home: Path) -> dict[str, str]:
    return {"HF_HOME": str(home / "hf"), "XDG_CONFIG_HOME": str(home / "cfg"), "XDG_DATA_HOME": str(home / "data")}


def isolate_user_env(monkeypatch, home: Path) -> Path:
    """No ARIA_* variable, Hub offline/endpoint/cache override or user config reaches the test;
    the HF cache and aria's config and data directories live under `home`."""
    for var in list(os.environ):
        if _foreign(var):
            monkeypatch.delenv(var)
    for var, value in _user_dirs(home).items():
        monkeypatch.setenv(var, value)
    return home


def isolated_env(home: Path, **extra: str) -> dict[str, str]:
    """The same isolation as an environment for a child process, plus `extra`."""
    env = {var: value for var, value in os.environ.items() if not _foreign(var)}
    return {**env, **_user_dirs(home), **extra}
