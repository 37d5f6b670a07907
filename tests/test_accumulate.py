"""The exact accumulator: any arrival order gives the same bytes; add-then-remove is exact;
non-finite and out-of-range updates are refused before the sum changes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedcore.errors import PayloadError
from fedcore.strategy import FedBuff, WeightedMeanAggregator
from fedcore.strategy.accumulate import MAX_MAGNITUDE, MAX_TOTAL, ExactSum
from fedcore.weights import Weights

finite32 = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)
tensor = hnp.arrays(np.float32, (5,), elements=finite32)
updates = st.lists(st.tuples(tensor, st.integers(1, 10_000)), min_size=1, max_size=8)


def _mean_bytes(items: list[tuple[np.ndarray, int]], order: list[int]) -> bytes:
    agg = WeightedMeanAggregator()
    for i in order:
        x, n = items[i]
        agg.add({"w": x.copy(), "b": x[:2].copy()}, n)
    out = agg.result()
    return out["w"].tobytes() + out["b"].tobytes()


@settings(max_examples=60, deadline=None)
@given(items=updates, data=st.data())
def test_any_permutation_gives_identical_bytes(
    items: list[tuple[np.ndarray, int]], data: st.DataObject
) -> None:
    order = data.draw(st.permutations(range(len(items))))
    assert _mean_bytes(items, list(order)) == _mean_bytes(items, list(range(len(items))))
    sums = []
    for o in (order, range(len(items))):
        s = ExactSum()
        for i in o:
            s.add({"w": items[i][0]}, items[i][1])
        sums.append(s.digest_bytes())
    assert sums[0] == sums[1]


def test_float_order_dependence_is_gone() -> None:
    """Positive control: these three float32 updates sum differently in float32 depending on
    order (1e8 swallows 1); the aggregator's mean is the same bytes either way, and exact."""
    big, one = np.float32(1e8), np.float32(1)
    items = [(np.array([big], np.float32), 1), (np.array([one], np.float32), 1)]
    items.append((np.array([-big], np.float32), 1))
    assert (big + one) - big != (big - big) + one  # float32 addition is not associative
    results = {_mean_bytes(items, list(order)) for order in ([0, 1, 2], [0, 2, 1], [1, 2, 0])}
    assert len(results) == 1
    agg = WeightedMeanAggregator()
    for x, n in items:
        agg.add({"w": x.copy(), "b": x.copy()}, n)
    assert agg.result()["w"][0] == np.float32(1 / 3)


@settings(max_examples=60, deadline=None)
@given(before=updates, extra=tensor, weight=st.integers(1, 10_000))
def test_add_then_remove_returns_exactly_the_previous_state(
    before: list[tuple[np.ndarray, int]], extra: np.ndarray, weight: int
) -> None:
    s = ExactSum()
    for x, n in before:
        s.add({"w": x}, n)
    state = s.digest_bytes()
    s.add({"w": extra}, weight)
    s.remove({"w": extra}, weight)
    assert s.digest_bytes() == state
    assert s.count == len(before)


@settings(max_examples=40, deadline=None)
@given(items=updates)
def test_sum_matches_exact_arithmetic(items: list[tuple[np.ndarray, int]]) -> None:
    """Within 2 float64 ulps of the exactly rounded sum (Python's math.fsum on the terms)."""
    import math

    s = ExactSum()
    for x, n in items:
        s.add({"w": x}, n)
    got = s.total()["w"]
    for j in range(5):
        exact = math.fsum(float(x[j]) * n for x, n in items)
        assert got[j] == pytest.approx(exact, rel=4.5e-16, abs=2.0**-56)


def test_carrying_at_any_time_changes_nothing() -> None:
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=50).astype(np.float32) * 1e3 for _ in range(10)]
    a, b = ExactSum(), ExactSum()
    for x in xs:
        a.add({"w": x}, 3)
        b.add({"w": x}, 3)
        b.digest_bytes()  # carries the limbs now
    assert a.digest_bytes() == b.digest_bytes()


@pytest.mark.parametrize(
    ("value", "reason"),
    [(np.nan, "not finite"), (np.inf, "not finite"), (MAX_MAGNITUDE, "beyond the exact")],
)
def test_non_finite_and_out_of_range_updates_are_refused_and_leave_no_trace(
    value: float, reason: str
) -> None:
    s = ExactSum()
    s.add({"a": np.ones(3, np.float64), "b": np.ones(2, np.float64)}, 2)
    state = s.digest_bytes()
    hostile = {"a": np.ones(3, np.float64), "b": np.array([1.0, value])}
    with pytest.raises(PayloadError, match=reason):
        s.add(hostile, 1)
    assert s.digest_bytes() == state
    assert s.count == 1
    # The weight counts too: a term in range that a large example count pushes out of it.
    with pytest.raises(PayloadError, match="beyond the exact"):
        s.add({"a": np.full(3, MAX_MAGNITUDE / 4), "b": np.ones(2)}, 4)
    # Positive control: the largest term in range is taken.
    s.add({"a": np.full(3, MAX_MAGNITUDE / 8), "b": np.ones(2)}, 4)
    assert s.count == 2


def test_a_sum_that_could_overflow_is_refused() -> None:
    """Each term in range, but together they would overflow the int64 limbs."""
    s = ExactSum()
    big = {"a": np.full(2, MAX_MAGNITUDE / 2)}
    taken = MAX_TOTAL // int(MAX_MAGNITUDE // 2) - 1
    for _ in range(taken):
        s.add(big)
    with pytest.raises(PayloadError, match="sum of this round"):
        s.add(big)
    assert s.total()["a"][0] == taken * MAX_MAGNITUDE / 2  # the limbs did not overflow
    s.remove(big)  # room again
    s.add(big)


def test_mismatched_updates_are_refused() -> None:
    s = ExactSum()
    s.add({"a": np.ones(3)})
    with pytest.raises(ValueError, match="differ"):
        s.add({"b": np.ones(3)})
    with pytest.raises(ValueError, match="shape"):
        s.add({"a": np.ones(4)})
    with pytest.raises(ValueError, match="weight"):
        s.add({"a": np.ones(3)}, 0)


def test_integer_tensors_round_back() -> None:
    agg = WeightedMeanAggregator()
    agg.add({"n": np.array([3], np.int64)}, 1)
    agg.add({"n": np.array([4], np.int64)}, 2)
    out = agg.result()["n"]
    assert out.dtype == np.int64
    assert out.tolist() == [4]  # (3 + 8) / 3 = 3.67


def test_fedbuff_buffer_order_does_not_matter() -> None:
    rng = np.random.default_rng(1)
    g: Weights = {"w": rng.normal(size=20).astype(np.float32)}
    ups = [g["w"] + rng.normal(size=20).astype(np.float32) * 1e-2 for _ in range(5)]
    staleness = [0, 3, 1, 0, 7]

    def run(order: list[int]) -> bytes:
        agg = FedBuff(server_lr=0.7).start_aggregation(1, g)
        for i in order:
            agg.add({"w": ups[i].copy()}, 10, staleness=staleness[i])
        return agg.result()["w"].tobytes()

    assert run([0, 1, 2, 3, 4]) == run([4, 2, 0, 3, 1]) == run([3, 4, 1, 0, 2])


# ---------------------------------------------------------------- the one-limb sum


@settings(max_examples=60, deadline=None)
@given(items=updates, data=st.data())
def test_one_limb_any_permutation_gives_identical_bytes(
    items: list[tuple[np.ndarray, int]], data: st.DataObject
) -> None:
    from fedcore.strategy.fixed_point import FixedPointSum

    budget = sum(n for _, n in items)
    order = data.draw(st.permutations(range(len(items))))
    digests = []
    for o in (order, range(len(items))):
        s = FixedPointSum(budget)
        for i in o:
            x, n = items[i]
            s.add({"w": x / np.float32(1e3)}, n)  # inside the float cap of 2**24
        digests.append(s.digest_bytes())
    assert digests[0] == digests[1]


def test_one_limb_sum_cannot_overflow_at_its_bounds() -> None:
    """Every value just under the cap, every weight of the budget used: the int64 holds."""
    from fedcore.strategy.fixed_point import FLOAT_CAP_BITS, FixedPointSum

    budget = 3 * 2**20
    cap = np.nextafter(np.float32(2**FLOAT_CAP_BITS), np.float32(0))
    s = FixedPointSum(budget)
    for _ in range(3):
        s.add({"w": np.full(4, cap, np.float32)}, 2**20)
    got = s.total(budget)["w"]
    # total() is typed NDArray[np.generic]; without dtypes it is float64, so astype copies.
    np.testing.assert_allclose(got.astype(np.float64), float(cap), rtol=1e-12)
    with pytest.raises(ValueError, match="weight budget"):
        s.add({"w": np.ones(4, np.float32)}, 1)
    with pytest.raises(PayloadError, match="beyond the exact sum's range"):
        FixedPointSum(10).add({"w": np.full(2, 2.0**FLOAT_CAP_BITS, np.float32)}, 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -(2.0**24)])
@pytest.mark.parametrize("where", ["first block", "last block"])
def test_one_limb_fold_refusing_any_block_of_a_piece_leaves_no_trace(
    bad: float, where: str
) -> None:
    """The fold checks each cache-sized block as it goes; a bad element in a later block
    takes the blocks already folded back out, so the refused piece leaves no trace."""
    from fedcore.strategy.fixed_point import FixedPointSum

    size = 3 * 2**15 + 17  # several of the fold's 2**15-element blocks, the last one short
    rng = np.random.default_rng(5)
    s = FixedPointSum(10)
    s.declare("w", (size,), np.dtype(np.float32))
    s.reserve(3)
    s.fold("w", 0, rng.normal(size=size).astype(np.float32), 1.0, +1)
    before = s.digest_bytes()
    piece = rng.normal(size=size - 5).astype(np.float32)
    # Positive control: the clean piece changes the sum, and taking it back restores it.
    s.fold("w", 5, piece, 2.0, +1)
    assert s.digest_bytes() != before
    s.fold("w", 5, piece, 2.0, -1)
    assert s.digest_bytes() == before
    piece[0 if where == "first block" else -1] = bad
    with pytest.raises(PayloadError, match=r"NaN or Inf|beyond the exact sum's range"):
        s.fold("w", 5, piece, 2.0, +1)
    assert s.digest_bytes() == before
