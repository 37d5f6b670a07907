"""Exact integer noise: the discrete Gaussian, for releases summed in the secure-aggregation ring.

Floating-point Gaussian noise is not what its proof assumes (its low bits can leak the value
it was added to; Mironov 2012 for the Laplace case). Where a release is an integer vector
anyway, as in the fixed-point ring secure aggregation masks, the noise is drawn exactly
instead: the discrete Gaussian ``N_Z(0, sigma^2)`` (P[x] proportional to
``exp(-x^2 / 2 sigma^2)`` on the integers; Canonne, Kamath, Steinke 2020, "CKS20").

**Sampler.** OpenDP's (``opendp==0.16.0``, ``make_gaussian`` on a vector of 64-bit integers),
the CKS20 rejection sampler in exact rational arithmetic, fed by OpenDP's CSPRNG (OpenSSL's
``RAND_bytes``); we write no sampler of our own. Nothing is seeded. One call per tensor is
already vectorised (a loop in Rust); what remains is the sampler's own cost, about 10 µs of
CPU a draw. OpenDP is called through ``ctypes.CDLL``, which releases the GIL, so a long
vector is cut into chunks drawn by several threads at once (each chunk an independent call
of the same measurement: the draws are independent and identically distributed either way).
``scripts/bench_dp_sampler.py`` measures it.

**Privacy.** A vector of integer L2 sensitivity ``Delta`` plus ``N_Z(0, sigma^2)`` per
coordinate is ``(Delta / sigma)^2 / 2``-zero-concentrated DP (CKS20, Theorem 14): the
same Rényi curve ``alpha Delta^2 / (2 sigma^2)`` as the continuous Gaussian, so the ledger's
Gaussian charge of multiplier ``sigma / Delta`` is an exact account of it. A *sum* of ``h``
independent shares ``N_Z(0, sigma^2 / h)`` is not itself a discrete Gaussian; Kairouz, Liu,
Steinke 2021 (Theorem 12) bound its Rényi divergence by the Gaussian curve plus ``tau * d``,
``tau = 10 sum_{k=1}^{h-1} exp(-2 pi^2 (sigma^2 / h) k / (k + 1))``, ``d`` the dimension.
:func:`check_sum_slack` refuses a share so small that this term is not negligible (below
1e-30, far under the accountant's own floating-point error); at the scales fedcore uses
(``sigma / h`` of at least thousands of ring units) it underflows to 0.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from fedcore.errors import ConfigError

__all__ = [
    "SUM_SLACK_LIMIT",
    "IntegerNoise",
    "check_sum_slack",
    "discrete_gaussian",
    "preload",
    "sum_slack",
]

#: ``(sigma, size) -> size`` draws of ``N_Z(0, sigma^2)``: :func:`discrete_gaussian`, or a
#: stand-in an auditor injects (a build with less noise, to show it is caught).
IntegerNoise = Callable[[float, int], npt.NDArray[np.int64]]

#: The largest additive Rényi term (``tau * d``) a distributed release may carry.
SUM_SLACK_LIMIT = 1e-30

# Vectors shorter than two chunks are drawn in one call: a thread hand-off costs more.
_CHUNK = 16_384
_THREADS = max(1, min(8, os.cpu_count() or 1))


@functools.lru_cache(maxsize=64)
def _sampler(scale: float) -> Any:
    import opendp.prelude as dp  # a compiled library: loaded on first use

    dp.enable_features("contrib")
    domain = dp.vector_domain(dp.atom_domain(T="i64"))
    return dp.m.make_gaussian(domain, dp.l2_distance(T="i64"), scale=scale)


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(_THREADS, thread_name_prefix="opendp")


def _draw(sampler: Any, size: int) -> npt.NDArray[np.int64]:
    return np.asarray(sampler(np.zeros(size, dtype=np.int64)), dtype=np.int64)


def preload() -> None:
    """Load OpenDP now (seconds on a busy machine) rather than inside a timed protocol phase."""
    _sampler(1.0)


def discrete_gaussian(sigma: float, size: int) -> npt.NDArray[np.int64]:
    """``size`` independent draws of ``N_Z(0, sigma^2)`` (from OpenDP's CSPRNG).

    Raises:
        ConfigError: ``sigma`` not positive and finite, or so large that a draw could
            overflow 64-bit integers.
    """
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ConfigError(f"the discrete Gaussian needs a positive finite sigma, got {sigma}")
    if sigma > 2.0**50:  # draws past ~40 sigma have probability below 2^-1000
        raise ConfigError(f"sigma {sigma:g} is too large for 64-bit integer noise")
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    sampler = _sampler(float(sigma))
    if _THREADS == 1 or size < 2 * _CHUNK:
        return _draw(sampler, size)
    chunks = min(_THREADS, size // _CHUNK)
    base, extra = divmod(size, chunks)
    sizes = [base + 1] * extra + [base] * (chunks - extra)
    parts = _pool().map(functools.partial(_draw, sampler), sizes)
    return np.concatenate(list(parts))


def sum_slack(share_sigma: float, shares: int, dimension: int) -> float:
    """Kairouz-Liu-Steinke's additive Rényi term ``tau * d`` for a sum of ``shares``
    independent ``N_Z(0, share_sigma^2)`` vectors of ``dimension`` coordinates."""
    exponent = 2 * math.pi**2 * share_sigma**2
    tau = 10 * sum(math.exp(-exponent * k / (k + 1)) for k in range(1, shares))
    return tau * dimension


def check_sum_slack(share_sigma: float, shares: int, dimension: int) -> None:
    """Refuse shares too small for the sum to be accounted as one Gaussian.

    Raises:
        ConfigError: the slack exceeds :data:`SUM_SLACK_LIMIT`.
    """
    slack = sum_slack(share_sigma, shares, dimension)
    if slack > SUM_SLACK_LIMIT:
        raise ConfigError(
            f"a sum of {shares} discrete-Gaussian shares of sigma {share_sigma:g} over "
            f"{dimension} coordinates is {slack:.3g} from a discrete Gaussian in Rényi "
            "divergence; use a finer fixed-point format or more noise"
        )
