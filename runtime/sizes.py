"""Byte counts as people read them, in messages and tables."""

from __future__ import annotations


def human_size(n: float) -> str:
    """1.5e10 -> '15.0 GB', 6.6e6 -> '6.6 MB': GB from 0.1 GB up (and for zero), else MB or kB, so
    a small model's sizes do not all print as '0.0 GB'."""
    if n == 0 or abs(n) >= 1e8:
        return f"{n / 1e9:.1f} GB"
    if abs(n) >= 1e5:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB"
