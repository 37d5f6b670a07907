"""Accuracy of federated analytics versus epsilon: relative error of mean, histogram and
median over 3 and 10 silos, in one run; prints JSON and draws a plot.

It runs the real query code in one process: each silo's exact local sums
(:func:`~fedcore.analytics.local.local_sums`), its share of the discrete Gaussian noise in
the ring (:func:`~fedcore.analytics.mechanism.noisy_share`, calibrated by the ledger's
accountant for one row replaced), the fixed-point encoding of secure aggregation (summed
modulo 2^64, decoded), and the answer's post-processing
(:func:`~fedcore.analytics.answer.cells_from_totals`). The pairwise masks are left out: they
cancel exactly (tests/test_secagg_*.py), so they change no number here.

Two networks: every silo with the default policy (``honest-silos = 1``: each adds the whole
noise, trusting no other silo), and every silo assuming all of them honest
(``honest-silos`` = the number of silos: the shares sum to the calibrated noise).

The data: scikit-learn's diabetes set (442 patients, no download) split evenly over the silos,
or, with ``--rows N``, N synthetic patients with the same bmi distribution. Errors:

* mean(bmi): |noisy - true| / |true|;
* histogram(age, 8 bins): sum |noisy - true| / number of records (L1, relative to N);
* median(bmi): |noisy - true| / |true|, the true value read from the same 64-bin histogram
  method without noise (so only the DP error is measured, not the binning's).

Usage::

    python scripts/bench_analytics.py                 # 200 trials per point
    python scripts/bench_analytics.py --trials 50 --out build/bench_analytics
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from fedcore.analytics.answer import cells_from_totals
from fedcore.analytics.encoding import FIXED_POINT
from fedcore.analytics.layout import Layout, plan_layout
from fedcore.analytics.local import local_sums
from fedcore.analytics.mechanism import noise_multiplier_for, noisy_share, total_noise_std
from fedcore.analytics.query import parse_query
from fedcore.data.metadata import FeatureInfo
from fedcore.data.table import Table

EPSILONS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
SILO_COUNTS = (3, 10)
DELTA = 1e-6
SCHEMA = {
    "age": FeatureInfo("age", "float64", minimum=18.0, maximum=90.0),
    "bmi": FeatureInfo("bmi", "float64", minimum=15.0, maximum=50.0),
}
QUERIES = {
    "mean": "mean(bmi)",
    "histogram": "histogram(age, bins=8)",
    "median": "median(bmi)",
}


def load_data(rows: int | None, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if rows is None:
        from sklearn.datasets import load_diabetes

        data = load_diabetes(scaled=False).data
        return {"age": data[:, 0].astype(float), "bmi": data[:, 2].astype(float)}
    return {
        "age": rng.uniform(19, 79, rows).round(),
        "bmi": np.clip(rng.normal(26.4, 4.4, rows), 18, 42.2),
    }


def split(data: dict[str, np.ndarray], silos: int, rng: np.random.Generator) -> list[Table]:
    order = rng.permutation(len(data["age"]))
    return [
        Table({k: v[idx] for k, v in data.items()}, len(idx))
        for idx in np.array_split(order, silos)
    ]


def secure_total(vectors: list[np.ndarray]) -> np.ndarray:
    """Each silo's noisy scaled sums in fixed point, summed in the ring, decoded."""
    total = np.zeros(vectors[0].size, dtype=np.uint64)
    for vector in vectors:
        words = np.empty(vector.size, dtype=np.uint64)
        FIXED_POINT.quantize(vector, 1.0, os.urandom(32), words)
        np.add(total, words, out=total)
    return FIXED_POINT.decode(total)


def answer_once(
    layout: Layout, tables: list[Table], z: float, honest: int, rng: np.random.Generator
) -> np.ndarray:
    scale = layout.scale_vector()
    vectors = [noisy_share(layout, local_sums(layout, t).values / scale, z, honest) for t in tables]
    totals = secure_total(vectors) * scale
    std = total_noise_std(layout, z, silos=len(tables), divisor=honest)
    cell = cells_from_totals(layout, totals, std, rng)[0]
    return np.asarray(cell.values if cell.values else [cell.value])


def truth(layout: Layout, tables: list[Table]) -> np.ndarray:
    totals = sum(local_sums(layout, t).values for t in tables)
    cell = cells_from_totals(layout, np.asarray(totals), np.zeros(layout.words))[0]
    return np.asarray(cell.values if cell.values else [cell.value])


def run(trials: int, rows: int | None, seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    data = load_data(rows, rng)
    n = len(data["age"])
    results: dict[str, dict[str, list[float]]] = {}
    for silos in SILO_COUNTS:
        tables = split(data, silos, rng)
        for honest, network in ((1, "honest-silos 1"), (silos, f"honest-silos {silos}")):
            for name, text in QUERIES.items():
                layout = plan_layout(parse_query(text), SCHEMA)
                exact = truth(layout, tables)
                errors = []
                for epsilon in EPSILONS:
                    z = noise_multiplier_for(epsilon, DELTA)
                    trial_errors = []
                    for _ in range(trials):
                        noisy = answer_once(layout, tables, z, honest, rng)
                        if name == "histogram":
                            trial_errors.append(float(np.abs(noisy - exact).sum() / n))
                        else:
                            trial_errors.append(float(abs(noisy[0] - exact[0]) / abs(exact[0])))
                    errors.append(float(np.mean(trial_errors)))
                results.setdefault(f"{silos} silos, {network}", {})[name] = errors
    return {
        "records": n,
        "delta": DELTA,
        "trials": trials,
        "epsilons": list(EPSILONS),
        "noise_multipliers": [noise_multiplier_for(e, DELTA) for e in EPSILONS],
        "mean_relative_error": results,
    }


def plot(report: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epsilons = report["epsilons"]
    results = report["mean_relative_error"]
    assert isinstance(results, dict)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharex=True)
    for ax, name in zip(axes, QUERIES, strict=True):
        for silos, style in zip(results, ("o-", "o--", "s-", "s--"), strict=False):
            ax.plot(epsilons, results[silos][name], style, label=silos)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{QUERIES[name]}")
        ax.set_xlabel("epsilon per query (delta 1e-6)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("mean relative error")
    axes[0].legend()
    fig.suptitle(f"Federated analytics on {report['records']} patients: DP error vs epsilon")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--rows", type=int, help="synthetic records instead of sklearn's 442")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("build/bench_analytics"))
    args = parser.parse_args()
    started = time.perf_counter()
    report = run(args.trials, args.rows, args.seed)
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(report, indent=1))
    print(f"plot: {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
