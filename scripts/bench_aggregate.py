"""Cost of exact, order-independent aggregation versus the float running sum it replaced.

Folds N example-weighted float32 updates of a P-parameter model into

* ``float32-running-sum``: fedcore's previous ``WeightedMeanAggregator`` (each update scaled
  in place and added to a float32 sum in arrival order; the result depends on that order);
* ``exact-two-limbs``: ``WeightedMeanAggregator`` without a weight budget (each update
  converted once to fixed point in two int64 limbs, :class:`~fedcore.strategy.accumulate.ExactSum`);
* ``exact-one-limb``: ``WeightedMeanAggregator`` with the round's weight budget, as the
  coordinator runs it (one int64 per parameter, :mod:`fedcore.strategy.fixed_point`); both
  exact ones give the same bytes in any order,

in one run, and prints JSON: milliseconds per update, the final division, peak memory the
aggregator allocated (tracemalloc, which numpy reports to), and whether two arrival orders
gave the same bytes.

Usage::

    python scripts/bench_aggregate.py                       # 1M and 10M parameters, 10 updates
    python scripts/bench_aggregate.py --params 1000000 --updates 20 --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from fedcore.strategy import WeightedMeanAggregator
from fedcore.weights import Weights


class Float32RunningSum:
    """The previous aggregator, kept here only as the baseline."""

    def __init__(self) -> None:
        self._sum: dict[str, np.ndarray] = {}
        self._total = 0.0

    def add(self, update: Weights, num_examples: int) -> None:
        w = float(num_examples)
        for name, array in update.items():
            scaled = np.multiply(array, w, out=array)
            total = self._sum.get(name)
            if total is None:
                self._sum[name] = scaled
            else:
                np.add(total, scaled, out=total)
        self._total += w

    def result(self) -> Weights:
        return {name: np.divide(t, self._total, out=t) for name, t in self._sum.items()}


Aggregator = Float32RunningSum | WeightedMeanAggregator


def _run(
    make: Callable[[], Aggregator], updates: list[Weights], counts: list[int], order: list[int]
) -> tuple[float, float, int, bytes]:
    """Seconds adding, seconds finishing, peak bytes allocated, the result's bytes."""
    copies = [{k: v.copy() for k, v in updates[i].items()} for i in order]
    agg = make()
    tracemalloc.start()
    started = time.perf_counter()
    for update, i in zip(copies, order, strict=True):
        agg.add(update, counts[i])
    added = time.perf_counter()
    out = agg.result()
    finished = time.perf_counter()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return added - started, finished - added, peak, b"".join(a.tobytes() for a in out.values())


def bench(params: int, num_updates: int, repeats: int) -> dict[str, object]:
    rng = np.random.default_rng(0)
    shapes = {"conv.weight": params // 2, "fc.weight": params - params // 2 - 10, "fc.bias": 10}
    updates: list[Weights] = [
        {k: rng.normal(0.0, 0.05, size=n).astype(np.float32) for k, n in shapes.items()}
        for _ in range(num_updates)
    ]
    counts = [int(c) for c in rng.integers(100, 1000, size=num_updates)]
    forward, backward = list(range(num_updates)), list(range(num_updates))[::-1]
    row: dict[str, object] = {"params": params, "updates": num_updates}
    makers: dict[str, Callable[[], Aggregator]] = {
        "float32-running-sum": Float32RunningSum,
        "exact-two-limbs": WeightedMeanAggregator,
        "exact-one-limb": functools.partial(WeightedMeanAggregator, weight_budget=sum(counts)),
    }
    for label, make in makers.items():
        best_add, best_finish, peak = float("inf"), float("inf"), 0
        for _ in range(repeats):
            add_s, finish_s, peak, first = _run(make, updates, counts, forward)
            best_add, best_finish = min(best_add, add_s), min(best_finish, finish_s)
        _, _, _, second = _run(make, updates, counts, backward)
        row[label] = {
            "ms_per_update": round(1000 * best_add / num_updates, 2),
            "ms_result": round(1000 * best_finish, 2),
            "peak_alloc_mb": round(peak / 2**20, 1),
            "same_bytes_in_reverse_order": first == second,
        }
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--updates", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = p.parse_args()
    rows = [bench(n, args.updates, args.repeats) for n in args.params]
    for row in rows:
        base = row["float32-running-sum"]["ms_per_update"]  # type: ignore[index]
        for label in ("exact-two-limbs", "exact-one-limb"):
            cell = row[label]
            cell["x_float32"] = round(cell["ms_per_update"] / base, 2)  # type: ignore[index]
    print(json.dumps({"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
