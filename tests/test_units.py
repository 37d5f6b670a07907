"""Sizes in logs: a LoRA update of a few kB is not "0.0 MB" (issue 27)."""

from __future__ import annotations

import pytest

from fedcore.units import format_bytes


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 kB"),
        (36_864, "36.9 kB"),  # a rank-8 LoRA update of a small model: not "0.0 MB"
        (796_840, "797 kB"),
        (999_600, "1.0 MB"),
        (40_000_000, "40.0 MB"),
        (2_400_000_000, "2.4 GB"),
    ],
)
def test_sizes_use_the_unit_that_shows_them(size: int, text: str) -> None:
    assert format_bytes(size) == text
