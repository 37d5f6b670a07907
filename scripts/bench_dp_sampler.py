"""Throughput of the exact discrete-Gaussian sampler (OpenDP), before and after issue 22's
follow-up, printed as JSON.

``before``: one ``make_gaussian`` call over ``vector_domain(atom_domain(T=int))`` with a Python
list, as ``fedcore.privacy.discrete`` drew until then. ``after``: ``discrete_gaussian`` as it is
now (64-bit integers from a NumPy array, long vectors in chunks on several threads, since
OpenDP's ctypes calls release the GIL). Both report wall-clock draws per second and draws per
CPU-second of this process (the latter is what an idle machine's one core would give; on a
shared, busy machine the wall figure is lower).

    python scripts/bench_dp_sampler.py --draws 200000 --sigma 1e4 --sigma 4e7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable

import numpy as np
import opendp.prelude as dp

from fedcore.privacy.discrete import discrete_gaussian


def _before(sigma: float) -> Callable[[int], object]:
    dp.enable_features("contrib")
    domain = dp.vector_domain(dp.atom_domain(T=int))
    measurement = dp.m.make_gaussian(domain, dp.l2_distance(T=int), scale=sigma)
    return lambda size: np.asarray(measurement([0] * size), dtype=np.int64)


def _after(sigma: float) -> Callable[[int], object]:
    return lambda size: discrete_gaussian(sigma, size)


def _measure(draw: Callable[[int], object], size: int) -> dict[str, float]:
    draw(1_000)  # load and build the measurement outside the timing
    wall, cpu = time.perf_counter(), time.process_time()
    draw(size)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "seconds": round(wall, 3),
        "draws_per_s": round(size / wall),
        "draws_per_cpu_s": round(size / cpu) if cpu > 0 else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=200_000)
    parser.add_argument("--sigma", type=float, action="append")
    args = parser.parse_args()
    rows = []
    for sigma in args.sigma or [1e4, 4e7]:
        before = _measure(_before(sigma), args.draws)
        after = _measure(_after(sigma), args.draws)
        rows.append(
            {
                "sigma": sigma,
                "before": before,
                "after": after,
                "speedup": round(before["seconds"] / after["seconds"], 2),
            }
        )
    print(
        json.dumps(
            {
                "draws": args.draws,
                "cpus": os.cpu_count(),
                "load_average": os.getloadavg()[0],
                "python": platform.python_version(),
                "results": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
