"""The round's exact sum gives its memory back while its result is made.

The sum is two float32 models (one int64 per element) and the result one more; made one after
the other they would be held whole at once, three models at the end of every round. With
``release=True`` each converted block of the sum goes back to the system, so the resident
memory shrinks while the result is made (the control, ``release=False``, gives nothing back),
the result is bit-identical, and the released sum refuses any further use.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from fedcore.strategy.fixed_point import FixedPointSum

SIZE = 4_000_000  # 16 MB float32 result, 32 MB sum
F32 = {"w": np.dtype(np.float32)}

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def _sum() -> FixedPointSum:
    rng = np.random.default_rng(7)
    total = FixedPointSum(100.0)
    for weight in (1.0, 3.0, 5.0):
        total.add({"w": rng.standard_normal(SIZE).astype(np.float32)}, weight)
    return total


@pytest.mark.parametrize("release", [True, False], ids=["released", "control-kept"])
def test_the_result_is_made_as_the_sum_goes(release: bool) -> None:
    expected = _sum().total(9.0, F32)
    total = _sum()
    before = _rss()
    result = total.total(9.0, F32, release=release)
    grown = _rss() - before
    np.testing.assert_array_equal(result["w"], expected["w"])
    result_bytes = SIZE * 4
    if release:
        assert grown < -result_bytes / 2  # the 32 MB sum went, the 16 MB result came
    else:
        assert grown > -result_bytes / 4  # the control: nothing given back, the sum stays


def test_a_released_sum_refuses_further_use() -> None:
    total = _sum()
    total.total(9.0, F32, release=True)
    for use in (
        lambda: total.total(9.0, F32),
        lambda: total.fold("w", 0, np.zeros(4, np.float32), 1.0, +1),
        total.digest_bytes,
    ):
        with pytest.raises(RuntimeError, match="released"):
            use()
