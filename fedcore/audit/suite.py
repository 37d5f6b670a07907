"""The mechanisms ``fed-audit`` audits, with their positive controls and run counts.

Every mechanism is configured to claim epsilon :data:`EPSILON` at delta :data:`DELTA` for one
release. The pair is chosen for the audit's power, not as a recommended budget: the
accountant's claim is a whole curve of ``(epsilon, delta)`` pairs, each of which must hold,
and at ``delta = 0.1`` two thousand runs a side show a bound above epsilon 3 when the noise is
half of what is accounted, where a bound above the claim at ``delta = 1e-5`` would take
millions.

``ci`` run counts keep the whole suite to seconds (the pytest suite runs it); ``full`` runs
each mechanism long enough to tighten the bounds (minutes). ``None``: not in that setting.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fedcore.privacy import AdaptiveClipping, calibrate_noise_multiplier
from fedcore.privacy.accountant import Mechanism, Relation
from fedcore.privacy.dpsgd import RELATION as DPSGD_RELATION

from .analytics import AnalyticsQuery, ExactMinCountRefusal
from .dpsgd import DPSGDSilo
from .fedavg import FedAvgRound, RawBitsAdaptiveClipping
from .mechanism import AuditedMechanism
from .runner import Expect

__all__ = ["DELTA", "EPSILON", "SUITE", "Entry", "Setting", "entries"]

EPSILON = 3.0
DELTA = 0.1
#: The min-count of the free-refusal control (fedcore's rule before issue 22).
MIN_COUNT = 10

Setting = Literal["ci", "full"]


@functools.cache
def _z(mechanism: Mechanism = "best", relation: Relation = "add-remove") -> float:
    """The multiplier of one Gaussian release at EPSILON, DELTA (the code's calibration; Rényi
    DP for the mechanisms the code accounts by it: client-level DP, analytics)."""
    return calibrate_noise_multiplier(
        target_epsilon=EPSILON,
        delta=DELTA,
        sample_rate=1.0,
        steps=1,
        mechanism=mechanism,
        relation=relation,
    )


@dataclass(frozen=True)
class Entry:
    """One line of the audit table."""

    name: str
    expect: Expect
    build: Callable[[], AuditedMechanism]
    ci: int | None  # runs on each side in the CI setting
    full: int | None
    note: str = ""

    def runs(self, setting: Setting) -> int | None:
        return self.ci if setting == "ci" else self.full


def _fedavg(**kwargs: object) -> Callable[[], AuditedMechanism]:
    def build() -> AuditedMechanism:
        z = _z("rdp")  # client-level DP is accounted by Rényi DP (discrete Gaussian noise)
        return FedAvgRound(z, DELTA, **kwargs)  # type: ignore[arg-type]

    return build


def _adaptive(count_noise: float, *, raw_bits: bool) -> Callable[[], AuditedMechanism]:
    def clipping() -> AdaptiveClipping:
        kind = RawBitsAdaptiveClipping if raw_bits else AdaptiveClipping
        return kind(1.0, count_noise_std=count_noise * _z("rdp"))

    return _fedavg(adaptive=clipping)


def _query(text: str, **kwargs: object) -> Callable[[], AuditedMechanism]:
    def build() -> AuditedMechanism:
        return AnalyticsQuery(text, EPSILON, DELTA, **kwargs)  # type: ignore[arg-type]

    return build


_COUNT = "count() where x >= 0"

SUITE: tuple[Entry, ...] = (
    Entry("dp-fedavg", "private", _fedavg(), 500, 20_000),
    Entry(
        "dp-fedavg-distributed",
        "private",
        _fedavg(mode="distributed"),
        500,
        20_000,
        "each worker adds its share of the noise",
    ),
    Entry(
        "dp-fedavg-adaptive",
        "private",
        _adaptive(2.0, raw_bits=False),
        500,
        20_000,
        "count noise 2z",
    ),
    Entry(
        "dp-fedavg-lying-worker",
        "private",
        _fedavg(lying_worker=True),
        500,
        20_000,
        "the canary's worker skips its clip: the coordinator clips the streamed update",
    ),
    Entry(
        "dp-fedavg-lying-worker-unchecked",
        "leaky",
        _fedavg(mode="distributed", lying_worker=True),
        500,
        20_000,
        "control: the same worker where nobody re-clips (distributed noise trusts workers)",
    ),
    Entry(
        "dp-fedavg-halved-noise",
        "leaky",
        _fedavg(noise_factor=0.5),
        2_000,
        20_000,
        "control: the noise drawn at half the accounted std",
    ),
    Entry(
        "dp-fedavg-adaptive-raw-bits",
        "leaky",
        _adaptive(0.52, raw_bits=True),
        5_000,  # the central noise is unseeded: 2,000 runs bounded it at 2.93 to 3.69
        20_000,
        "control: main's z_upd formula on raw 0/1 bits, count noise 0.52z",
    ),
    Entry("analytics-count", "private", _query(_COUNT), 3_000, 50_000),
    Entry("analytics-sum", "private", _query("sum(x)"), 3_000, 50_000),
    Entry(
        "analytics-count-halved-noise",
        "leaky",
        _query(_COUNT, noise_factor=0.5),
        3_000,
        50_000,
        "control: the noise drawn at half the accounted std",
    ),
    Entry(
        "analytics-count-small-cell",
        "private",
        _query(_COUNT, rows=[1.0] * (MIN_COUNT - 1), others=[1.0] * 20),
        400,
        5_000,
        f"the canary's cell holds {MIN_COUNT} rows: released with noise, nothing refused",
    ),
    Entry(
        "analytics-free-refusal",
        "leaky",
        _query(
            _COUNT,
            rows=[1.0] * (MIN_COUNT - 1),
            others=[1.0] * 20,
            admission=ExactMinCountRefusal(MIN_COUNT),
        ),
        400,
        5_000,
        "control: a refusal exactly when a cell's count is below min-count",
    ),
    Entry(
        "dpsgd",
        "private",
        lambda: DPSGDSilo(_z(relation=DPSGD_RELATION), DELTA),
        30,
        2_000,
        "CI: a smoke run (about 50 ms a run); --full audits it",
    ),
    Entry(
        "dpsgd-halved-noise",
        "leaky",
        lambda: DPSGDSilo(_z(relation=DPSGD_RELATION), DELTA, noise_factor=0.5),
        None,
        2_000,
        "control: trains at z/2, claims z",
    ),
)


def entries(names: tuple[str, ...] = ()) -> tuple[Entry, ...]:
    """The suite, or the entries named (in the suite's order).

    Raises:
        KeyError: a name that is not in the suite.
    """
    known = {e.name for e in SUITE}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"no audited mechanism {', '.join(unknown)}; known: {', '.join(known)}")
    return tuple(e for e in SUITE if not names or e.name in names)
