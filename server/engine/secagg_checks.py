"""Sanity bounds on what secure aggregation unmasks, which no single worker can be trusted on.

The coordinator sees only the *sum* of masked inputs, so it cannot check one worker's input;
it can check the sum against what must hold when everyone is honest, and refuse to let a lie
crash or dominate the round:

* the summed example count lies between the number of contributors (an honest worker counts
  at least one example) and the sum of what they announced at join (each capped at the
  round's weight norm, as the workers cap it). A count outside is a lie (a zero count would
  divide by zero, a tiny one would inflate the mean); the coordinator then uses the announced
  sum, logs why, and the round goes on;
* every coordinate of the honest example-weighted mean of clipped deltas lies within the
  clipping range; the mean is clipped to it, so one worker's out-of-range input moves the
  model by at most the range an honest worker could.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from fedcore.secagg.quantize import FixedPoint
from fedcore.weights import ModelSignature, Weights

#: Coordinates decoded at a time by :func:`bounded_update` (its float64 buffer stays in cache).
_BLOCK = 1 << 16

__all__ = ["bounded_count", "bounded_mean", "bounded_update"]

log = logging.getLogger("fedcore.server")


def bounded_count(
    round_number: int, unmasked: int, announced: Iterable[int], weight_norm: float
) -> int:
    """The example count to divide by: ``unmasked`` when plausible, else the announced sum."""
    caps = [min(max(n, 1), max(int(weight_norm), 1)) for n in announced]
    low, high = len(caps), sum(caps)
    if low <= unmasked <= high:
        return unmasked
    log.warning(
        "round %d: the masked example counts sum to %d, outside [%d, %d] (contributors, their "
        "announced examples): a worker lied about its count; weighting by the announced %d",
        round_number,
        unmasked,
        low,
        high,
        high,
    )
    return max(high, 1)


def _warn_outside(round_number: int, outside: int, clip: float) -> None:
    log.warning(
        "round %d: %d coordinate(s) of the unmasked mean lie outside the clipping range "
        "+-%g (a worker sent an out-of-range input); they are clipped",
        round_number,
        outside,
        clip,
    )


def bounded_mean(
    round_number: int,
    weighted_sum: npt.NDArray[np.float64],
    weight_norm: float,
    count: int,
    *,
    clip: float,
    step: float,
) -> npt.NDArray[np.float64]:
    """The example-weighted mean delta, clipped to ``[-clip, clip]`` (where every honest mean
    lies, up to rounding: ``step`` is one quantization step)."""
    mean = weighted_sum * (weight_norm / count)
    # Stochastic rounding may land a step or so past the range: only more is a warning.
    outside = int(np.count_nonzero(np.abs(mean) > clip * 1.01 + step))
    if outside:
        _warn_outside(round_number, outside, clip)
    np.clip(mean, -clip, clip, out=mean)
    return mean


def bounded_update(
    round_number: int,
    words: npt.NDArray[np.unsignedinteger],
    fixed_point: FixedPoint,
    weight_norm: float,
    count: int,
    global_weights: Weights,
    signature: ModelSignature,
) -> Weights:
    """Global weights plus the bounded mean delta (:func:`bounded_mean` of the decoded ring
    sum ``words``), as full weights, computed block by block: the same values as decoding,
    bounding and adding whole vectors, without their model-sized float64 temporaries (each a
    fresh mapping whose pages fault in on every round)."""
    clip = fixed_point.clip
    limit = clip * 1.01 + 1.0 / fixed_point.scale
    signed = words.view(np.int32 if fixed_point.ring_bits == 32 else np.int64)
    scale, factor = fixed_point.scale, weight_norm / count
    buffer = np.empty(min(_BLOCK, max(words.size, 1)), np.float64)
    update: Weights = {}
    outside = 0
    offset = 0
    for spec in signature:
        base = np.asarray(global_weights[spec.name]).reshape(-1)
        out = np.empty(spec.num_elements, dtype=base.dtype)
        for start in range(0, spec.num_elements, _BLOCK):
            stop = min(start + _BLOCK, spec.num_elements)
            x = buffer[: stop - start]
            np.copyto(x, signed[offset + start : offset + stop], casting="unsafe")
            x /= scale  # as FixedPoint.decode
            x *= factor  # as bounded_mean
            outside += int(np.count_nonzero(np.abs(x) > limit))
            np.clip(x, -clip, clip, out=x)
            np.add(x, base[start:stop], out=x)
            np.copyto(out[start:stop], x, casting="unsafe")
        update[spec.name] = out.reshape(spec.shape)
        offset += spec.num_elements
    if outside:
        _warn_outside(round_number, outside, clip)
    return update
