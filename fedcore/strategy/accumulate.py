"""An exact, order-independent sum of weighted updates: fixed point in int64 limbs.

Float addition is not associative, so a running float sum depends on the order in which
updates arrive, and two identical federations end with different models. Here each weighted
update ``weight * x`` is converted *once* (independently of every other update) to a signed
fixed-point integer with :data:`FRACTION_BITS` fractional bits, held as two 52-bit limbs in
int64 arrays, and summed with integer addition. Integer addition is associative and
commutative, so any arrival order gives the same limbs, bit for bit; subtracting the same
conversion takes an update back out exactly (:meth:`ExactSum.remove`). The limbs are turned
back into floats once, at the end.

Resolution and range of one weighted term ``weight * x`` (rounded to float64 first, which is
exact for float32 ``x`` and integer weights below 2**29): steps of ``2**-60``, magnitude below
``2**44`` (about 1.8e13); the sum's magnitude stays below ``2**54`` (about 1.8e16, checked
with an exact bound). A term outside the range, or not finite, or an update that could take
the sum out of its range, is refused with :class:`~fedcore.errors.PayloadError` before the sum
changes. Memory: two int64 per parameter (16 bytes, four float32 models) plus a few
cache-sized scratch buffers; never a list of updates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from fedcore.errors import PayloadError

__all__ = ["FRACTION_BITS", "LIMB_BITS", "MAX_MAGNITUDE", "MAX_TOTAL", "ExactSum"]

#: Bits per limb: a float64 holds any integer below 2**53 exactly, so each digit converts
#: exactly. Every digit is below ``2**52`` in magnitude, so int64 limbs take ``2**10``
#: additions (with room to spare) before a carry must run (:meth:`ExactSum._carry`).
LIMB_BITS = 52
#: Fractional bits of the fixed point: a weighted term is rounded to a multiple of 2**-60.
FRACTION_BITS = 60
_LIMBS = 2
#: The largest weighted term (exclusive) the limbs hold: ``2**(2*52 - 60)``.
MAX_MAGNITUDE = 2.0 ** (_LIMBS * LIMB_BITS - FRACTION_BITS)
_OPS_BEFORE_CARRY = 2**10
#: The largest the whole sum may grow (exclusive), so the top limb, in units of 2**-8, stays
#: below 2**62 with room for the carries.
MAX_TOTAL = 2**54

Float64Array = npt.NDArray[np.float64]
Int64Array = npt.NDArray[np.int64]


class ExactSum:
    """The exact sum of weighted tensors, keyed by name; the result is independent of the
    order of :meth:`add` and :meth:`remove` calls.

    Every added mapping must have the same names and shapes (the first one fixes them).
    """

    def __init__(self) -> None:
        self._limbs: dict[str, list[Int64Array]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._ops_since_carry = 0
        self._count = 0
        self._scratch = _Scratch()
        # An exact upper bound of every element's magnitude in the sum (in whole units):
        # the sum of each update's largest term.
        self._bound = 0

    @property
    def count(self) -> int:
        """Updates added minus updates removed."""
        return self._count

    def add(self, update: Mapping[str, npt.NDArray[np.generic]], weight: float = 1.0) -> None:
        """Add ``weight * update``; refuses (and changes nothing) if a term is not finite or
        out of range."""
        self._apply(update, weight, +1)
        self._count += 1

    def remove(self, update: Mapping[str, npt.NDArray[np.generic]], weight: float = 1.0) -> None:
        """Take back exactly what ``add(update, weight)`` added."""
        self._apply(update, weight, -1)
        self._count -= 1

    def total(
        self, divisor: float = 1.0, dtypes: Mapping[str, np.dtype[np.generic]] | None = None
    ) -> dict[str, npt.NDArray[np.generic]]:
        """``sum / divisor`` per tensor, in ``dtypes[name]`` (default float64; integer dtypes
        are rounded to the nearest integer). The limbs are carried to their canonical form
        and converted to float64 once (within two float64 ulps of the exact value), divided,
        then rounded to the dtype: one function of the sum, whatever the order of updates."""
        if not divisor > 0:
            raise ValueError(f"divisor must be positive, got {divisor}")
        self._carry()
        out: dict[str, npt.NDArray[np.generic]] = {}
        for name, limbs in self._limbs.items():
            dtype = np.dtype(np.float64) if dtypes is None else dtypes[name]
            result = np.empty(limbs[0].size, dtype=dtype)
            for lo in range(0, result.size, _CHUNK):
                hi = min(lo + _CHUNK, result.size)
                v, p, _ = self._scratch.take(hi - lo)
                # Highest limb first: each later addition is far smaller than the running value.
                top = _LIMBS - 1
                np.multiply(limbs[top][lo:hi], _LIMB_SCALES[top] * 2.0**-FRACTION_BITS, out=v)
                for i in range(top - 1, -1, -1):
                    np.multiply(limbs[i][lo:hi], _LIMB_SCALES[i] * 2.0**-FRACTION_BITS, out=p)
                    np.add(v, p, out=v)
                if divisor != 1.0:
                    np.divide(v, divisor, out=v)
                if dtype.kind != "f":
                    np.rint(v, out=v)
                np.copyto(result[lo:hi], v, casting="unsafe")
            out[name] = result.reshape(self._shapes[name])
        return out

    def digest_bytes(self) -> bytes:
        """The canonical limbs of every tensor, in name order: equal bytes, equal sums."""
        self._carry()
        return b"".join(
            name.encode() + b"\0" + b"".join(limb.astype("<i8").tobytes() for limb in limbs)
            for name, limbs in sorted(self._limbs.items())
        )

    def _apply(
        self, update: Mapping[str, npt.NDArray[np.generic]], weight: float, sign: int
    ) -> None:
        w = float(weight)
        if not (np.isfinite(w) and w > 0):
            raise ValueError(f"an update's weight must be positive and finite, got {weight}")
        if self._limbs and set(update) != set(self._limbs):
            raise ValueError(
                f"update tensors {sorted(update)} differ from the sum's {sorted(self._limbs)}"
            )
        # Check every tensor before touching the limbs: a refused update leaves no trace.
        bound = 0
        for name, array in update.items():
            bound = max(bound, math.ceil(_check_range(name, array, w)))
            shape = self._shapes.get(name)
            if shape is not None and array.shape != shape:
                raise ValueError(f"tensor {name!r} has shape {array.shape}, the sum has {shape}")
        if sign > 0 and self._bound + bound >= MAX_TOTAL:
            # Only a sum of huge updates gets here (2**10 updates each near MAX_MAGNITUDE).
            raise PayloadError(
                f"the sum of this round's updates could exceed +-2**{MAX_TOTAL.bit_length() - 1}"
                " (the exact accumulator's range, which keeps its int64 limbs from "
                "overflowing); the update is refused"
            )
        if self._ops_since_carry >= _OPS_BEFORE_CARRY:
            self._carry()
        for name, array in update.items():
            limbs = self._limbs.get(name)
            if limbs is None:
                size = array.size
                limbs = [np.zeros(size, dtype=np.int64) for _ in range(_LIMBS)]
                self._limbs[name] = limbs
                self._shapes[name] = array.shape
            _accumulate(limbs, array, w, sign, self._scratch)
        self._ops_since_carry += 1
        self._bound += sign * bound

    def _carry(self) -> None:
        """Bring the limbs to canonical form: lower limbs in [0, 2**52), the top one signed.
        The represented integer does not change, so carrying at any time is harmless."""
        if self._ops_since_carry == 0:
            return
        for limbs in self._limbs.values():
            for lo in range(0, limbs[0].size, _CHUNK):
                hi = min(lo + _CHUNK, limbs[0].size)
                _, _, c = self._scratch.take(hi - lo)
                for i in range(_LIMBS - 1):
                    low, up = limbs[i][lo:hi], limbs[i + 1][lo:hi]
                    np.right_shift(low, LIMB_BITS, out=c)  # arithmetic shift: floor division
                    np.add(up, c, out=up)
                    np.left_shift(c, LIMB_BITS, out=c)
                    np.subtract(low, c, out=low)
        self._ops_since_carry = 0


def _check_range(name: str, array: npt.NDArray[np.generic], weight: float) -> float:
    """The largest weighted term of ``array``; refuses one out of range."""
    if array.size == 0:
        return 0.0
    # max and min propagate NaN; two passes without a model-sized temporary.
    extreme = max(abs(float(np.max(array))), abs(float(np.min(array)))) * weight
    if not np.isfinite(extreme):
        raise PayloadError(
            f"update tensor {name!r} holds a value that is not finite (or overflows when "
            f"weighted by {weight:g}); the update is refused"
        )
    if extreme >= MAX_MAGNITUDE:
        raise PayloadError(
            f"update tensor {name!r} weighted by {weight:g} reaches {extreme:.3g}, beyond the "
            f"exact accumulator's range of +-2**{_LIMBS * LIMB_BITS - FRACTION_BITS}; the "
            "update is refused"
        )
    return extreme


#: Elements converted at a time: the scratch arrays (3 x 256 KiB) stay in the CPU's cache, so
#: the dozen passes of a conversion cost little more than reading the update once.
_CHUNK = 1 << 15
_LIMB_SCALES = [2.0 ** (LIMB_BITS * i) for i in range(_LIMBS)]


class _Scratch:
    """One chunk's buffers, reused for every chunk of every update; they grow to the largest
    chunk asked for (at most :data:`_CHUNK` elements), so a small model costs little."""

    def __init__(self) -> None:
        self._scaled: Float64Array = np.empty(0)
        self._part: Float64Array = np.empty(0)
        self._digits: Int64Array = np.empty(0, dtype=np.int64)

    def take(self, n: int) -> tuple[Float64Array, Float64Array, Int64Array]:
        """Views of ``n`` elements (``n <= _CHUNK``) of each buffer."""
        if self._scaled.size < n:
            self._scaled, self._part = np.empty(n), np.empty(n)
            self._digits = np.empty(n, dtype=np.int64)
        return self._scaled[:n], self._part[:n], self._digits[:n]


def _accumulate(
    limbs: list[Int64Array],
    array: npt.NDArray[np.generic],
    w: float,
    sign: int,
    scratch: _Scratch,
) -> None:
    """Add ``sign * round(w * array * 2**60)`` to the limbs (each digit in (-2**52, 2**52)).
    Every step is exact: scaling by a power of two, truncation, subtracting the truncated
    high part of a float64 integer, and converting a float64 integer below 2**53 to int64."""
    flat = array.reshape(-1)
    factor = w * 2.0**FRACTION_BITS
    for lo in range(0, flat.size, _CHUNK):
        hi = min(lo + _CHUNK, flat.size)
        n = hi - lo
        scaled, part, digits = scratch.take(n)
        np.multiply(flat[lo:hi], factor, out=scaled, dtype=np.float64)
        np.rint(scaled, out=scaled)  # the one rounding: per update, whatever the order
        for i in range(_LIMBS - 1, -1, -1):
            if i:
                np.multiply(scaled, 1.0 / _LIMB_SCALES[i], out=part)
                # Truncate, not floor: the remainder then keeps the sign and is made of the
                # low bits of ``scaled``, so it is exact (a floor of a negative value would
                # leave 2**52 - small, which float64 may not hold).
                np.trunc(part, out=part)
            # Convert first, then add in int64: a float64 sum would round large limbs.
            np.copyto(digits, part if i else scaled, casting="unsafe")
            target = limbs[i][lo:hi]
            if sign > 0:
                np.add(target, digits, out=target)
            else:
                np.subtract(target, digits, out=target)
            if i:
                np.multiply(part, _LIMB_SCALES[i], out=part)
                np.subtract(scaled, part, out=scaled)
