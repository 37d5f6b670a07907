"""The setup a coordinator sends every participant of one secure round, derived from its
settings (:class:`~fedcore.secagg.params.SecAggParams`) and the round's participants."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from .messages import RoundSetup
from .params import SecAggParams
from .quantize import FixedPoint, ring_bits_for

__all__ = ["make_setup"]


def make_setup(
    params: SecAggParams,
    num_workers: int,
    weight_norm: float,
    round_id: str | None = None,
    *,
    members: Sequence[str] = (),
    job: str = "",
    round_number: int = 0,
) -> RoundSetup:
    """The round setup a coordinator sends ``num_workers`` workers (signed mode when
    ``members`` names them, in index order)."""
    if members and len(members) != num_workers:
        raise ValueError("members must name every worker of the round")
    fp = FixedPoint(params.bits, params.clip, ring_bits_for(params.bits, num_workers))
    return RoundSetup(
        round_id or uuid.uuid4().hex,
        params.threshold_for(num_workers),
        fp,
        float(weight_norm),
        params.phase_timeout,
        members=tuple(members),
        job=job,
        round_number=round_number,
        group_size=params.group_size(num_workers) if members else 0,
    )
