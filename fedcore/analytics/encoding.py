"""Noisy scaled sums as ring words for secure aggregation, and the setup of a query's round.

The scaled sums (each divided by its sensitivity, noise included) are at most about the
number of records, so one fixed-point format fits every query: 48 signed bits over
``[-2^27, 2^27]`` (a resolution of about 1e-6, up to 134 million records per silo) in the
64-bit ring, with the unbiased stochastic rounding of :mod:`fedcore.secagg.quantize`. The
rounding happens after the noise: it is post-processing and costs no privacy.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedcore.secagg.messages import RoundSetup
from fedcore.secagg.quantize import COUNT_WORDS, FixedPoint

__all__ = ["FIXED_POINT", "MAX_WORDS", "masked_words", "query_job", "round_setup"]

FIXED_POINT = FixedPoint(bits=48, clip=float(2**27), ring_bits=64)
#: The longest vector a query may release (a histogram of 200 bins over 50 groups).
MAX_WORDS = 10_000


def masked_words(layout_words: int) -> int:
    """Length of a silo's masked vector: its sums and the contributor-count words."""
    return layout_words + COUNT_WORDS


def query_job(query_id: str) -> str:
    """The job a signed query round is bound to: the query itself (round 1 of it), so a
    silo's participation record holds each query once, apart from every training job."""
    return f"query {query_id}"


def round_setup(
    query_id: str, silos: int, phase_timeout: float, *, members: Sequence[str] = ()
) -> RoundSetup:
    """The secure round of one query: threshold = every silo, weight 1 each; signed when
    ``members`` names the silos in index order (one sharing group of all of them)."""
    if members and len(members) != silos:
        raise ValueError("members must name every silo of the query")
    return RoundSetup(
        query_id,
        silos,
        FIXED_POINT,
        1.0,
        phase_timeout,
        members=tuple(members),
        job=query_job(query_id) if members else "",
        round_number=1 if members else 0,
        group_size=silos if members else 0,
    )
