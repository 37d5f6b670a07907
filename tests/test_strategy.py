"""FedAvg math against a direct numpy computation."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.errors import ConfigError
from fedcore.strategy import FedAvg, WeightedMeanAggregator, strategy_by_name
from fedcore.weights import Weights


def _updates(n: int, seed: int = 0) -> list[tuple[Weights, int]]:
    rng = np.random.default_rng(seed)
    return [
        (
            {
                "w": rng.standard_normal((4, 3)).astype(np.float32),
                "b": rng.standard_normal(3).astype(np.float64),
                "count": np.array(rng.integers(0, 100), dtype=np.int64),
            },
            int(rng.integers(1, 1000)),
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("n", [1, 2, 7])
def test_weighted_mean_matches_numpy(n: int) -> None:
    updates = _updates(n)
    total = sum(k for _, k in updates)
    expected = {
        name: sum(u[name].astype(np.float64) * k for u, k in updates) / total
        for name in updates[0][0]
    }
    agg = WeightedMeanAggregator()
    for u, k in updates:
        agg.add({name: a.copy() for name, a in u.items()}, k)
    out = agg.result()
    assert agg.count == n
    np.testing.assert_allclose(out["w"], expected["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["b"], expected["b"], rtol=1e-12)
    assert out["w"].dtype == np.float32
    assert out["count"].dtype == np.int64
    assert out["count"] == np.rint(expected["count"])


def test_read_only_updates_are_not_modified() -> None:
    a = np.ones(3, np.float32)
    a.flags.writeable = False
    agg = WeightedMeanAggregator()
    agg.add({"w": a}, 2)
    agg.add({"w": np.full(3, 4.0, np.float32)}, 1)
    np.testing.assert_allclose(agg.result()["w"], 2.0)
    np.testing.assert_array_equal(a, 1.0)


def test_empty_or_zero_weight_is_refused() -> None:
    agg = WeightedMeanAggregator()
    with pytest.raises(ValueError, match="no updates"):
        agg.result()
    with pytest.raises(ValueError, match="positive example count"):
        agg.add({"w": np.ones(1, np.float32)}, 0)


def test_strategy_lookup() -> None:
    assert isinstance(strategy_by_name("FedAvg"), FedAvg)
    with pytest.raises(ConfigError, match="built-in strategies: fedavg"):
        strategy_by_name("nope")
