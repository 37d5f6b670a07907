"""Sizes in words for logs: ``format_bytes(2048)`` is ``"2.0 kB"``, not ``"0.0 MB"``."""

from __future__ import annotations

__all__ = ["format_bytes"]

_UNITS = ("kB", "MB", "GB", "TB")


def format_bytes(size: int) -> str:
    """``size`` in the largest decimal unit (B, kB, MB, GB, TB) that keeps it at least 1,
    with one decimal below 100 of that unit: ``"512 B"``, ``"41.0 kB"``, ``"797 kB"``."""
    if size < 1000:
        return f"{size} B"
    value = float(size)
    for unit in _UNITS:
        value /= 1000.0
        if value < 999.5 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}" if value < 99.95 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")
