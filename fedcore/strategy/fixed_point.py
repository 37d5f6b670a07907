"""A cheap exact, order-independent weighted sum: one int64 per parameter, a budgeted scale.

Each weighted term ``w * x`` is converted on its own to the integer
``trunc(x * w * 2**F)`` (float64 arithmetic, then one truncation toward zero) and added to an
int64 accumulator. Integer addition is associative, so the sum's bits do not depend on the
order of updates (or of their pieces); subtracting the same integers takes an update, or the
part of it folded so far, back out exactly.

**No overflow, by construction.** The sum is given a *weight budget* ``W`` (the most weight
its updates may carry at once: for a round, the example counts its workers announced, which
bound what they may claim). With ``b = ceil(log2 W)`` every tensor gets a value cap ``X`` and a
scale ``2**F`` with ``X * 2**F = 2**(62 - b)``; an element ``|x| >= X`` (or not finite) is
refused before the sum changes. Then each term is at most ``2**(62 - b) * w`` in magnitude,
and since the weights held never exceed ``W <= 2**b`` (:meth:`FixedPointSum.reserve` refuses
more), any sum of held terms, and any partial sum of them, stays below ``2**62`` (plus a
float64 rounding of ``2**-52`` relative): the int64 never wraps.

Floating tensors get ``X = 2**24`` and ``F = 38 - b``; integer tensors ``F = 0`` (their terms
are whole numbers when weights are) and ``X = 2**(62 - b)``. The mean ``sum / W'`` of the
weight ``W'`` delivered is within ``N * 2**-F / W'`` of the exact weighted mean of ``N``
updates: with ``W' ~ W`` about ``N * 2**-37``, far below a float32 step of the values a model
holds.

The range check costs one BLAS pass: ``dot(x, x) < X**2 / 2`` proves every ``|x| < X`` (a sum
of squares bounds each square, and the margin covers the dot's rounding); only a piece that
fails it is checked element by element. Work per cache-sized block of a piece: that dot, one
multiply written straight into int64 scratch (numpy casts in its buffered loop), one integer
add. The check runs block by block, just before the block's conversion, so a piece is read
from memory once (8% faster than a dot over the whole piece first in one loaded measurement;
within the load's noise in ``scripts/bench_fold.py``); no model-sized temporary is made.
"""

from __future__ import annotations

import math
import mmap
import threading
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from fedcore.errors import PayloadError

__all__ = ["FLOAT_CAP_BITS", "SUM_BITS", "FixedPointSum"]

#: The sum of every term held stays below ``2**SUM_BITS``: one bit of room below int64's.
SUM_BITS = 62
#: A floating element must satisfy ``|x| < 2**FLOAT_CAP_BITS`` (about 1.7e7).
FLOAT_CAP_BITS = 24
#: Elements converted at a time: the int64 scratch (256 KiB) stays in the CPU's cache.
_BLOCK = 1 << 15

Int64Array = npt.NDArray[np.int64]


class FixedPointSum:
    """The exact sum of weighted tensors in one int64 limb per element; see the module doc.

    Tensors are declared once (:meth:`declare`, or by the first whole :meth:`add`); weight is
    reserved per update (:meth:`reserve`) before any of it is folded, and the reservation is
    what proves the sum cannot overflow. Thread-safe: pieces of different updates may be
    folded from different threads (numpy releases the GIL; a lock keeps the integer adds from
    interleaving).
    """

    def __init__(self, weight_budget: float) -> None:
        if not (math.isfinite(weight_budget) and weight_budget > 0):
            raise ValueError(f"the weight budget must be positive and finite, got {weight_budget}")
        self.budget = float(weight_budget)
        self._budget_bits = max(0, math.ceil(math.log2(self.budget)))
        self._acc: dict[str, Int64Array] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._exponents: dict[str, int] = {}
        self._caps: dict[str, float] = {}
        self._reserved = 0.0
        # Conversion scratch, grown to the largest tensor up to one block (a small model's
        # sum stays small).
        self._digits: Int64Array = np.empty(0, dtype=np.int64)
        self._released = False
        self.lock = threading.Lock()

    @property
    def reserved(self) -> float:
        """Weight of the updates held (or being folded) now."""
        return self._reserved

    def exponent(self, name: str) -> int:
        """``F`` of tensor ``name``: its terms are in units of ``2**-F``."""
        return self._exponents[name]

    def declare(self, name: str, shape: tuple[int, ...], dtype: np.dtype[np.generic]) -> None:
        """Allocate tensor ``name`` (zeros); a second declaration must agree with the first."""
        known = self._shapes.get(name)
        if known is not None:
            if known != tuple(shape):
                raise ValueError(f"tensor {name!r} has shape {tuple(shape)}, the sum has {known}")
            return
        size = math.prod(shape)
        self._acc[name] = _zeros(size)
        if self._digits.size < min(size, _BLOCK):
            self._digits = np.empty(min(size, _BLOCK), dtype=np.int64)
        self._shapes[name] = tuple(shape)
        room = SUM_BITS - self._budget_bits
        cap_bits = FLOAT_CAP_BITS if dtype.kind == "f" else room
        self._exponents[name] = room - cap_bits
        self._caps[name] = 2.0**cap_bits

    def reserve(self, weight: float) -> None:
        """Hold ``weight`` of the budget for one update; refuses a weight past the budget."""
        w = float(weight)
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"an update's weight must be positive and finite, got {weight}")
        if self._reserved + w > self.budget:
            raise ValueError(
                f"an update of weight {w:g} would take the sum past its weight budget "
                f"{self.budget:g} ({self._reserved:g} held), which keeps it from overflowing"
            )
        self._reserved += w

    def release(self, weight: float) -> None:
        """Give back a reservation (the update was taken back out)."""
        self._reserved = max(0.0, self._reserved - float(weight))

    def fold(
        self, name: str, start: int, values: npt.NDArray[np.generic], weight: float, sign: int
    ) -> None:
        """Add (``sign`` +1) or subtract (-1) ``weight * values`` at elements
        ``start..start+len(values)`` of tensor ``name``. Refuses (PayloadError) and changes
        nothing when an element is not finite or reaches the tensor's cap. The caller holds
        :attr:`lock` when other threads may fold too, and has reserved ``weight``."""
        flat = values.reshape(-1)
        acc = self._acc[name]
        if self._released:
            raise RuntimeError("the sum was released by total(release=True)")
        if start < 0 or start + flat.size > acc.size:
            raise ValueError(f"elements {start}..{start + flat.size} are outside {name!r}")
        factor = float(weight) * 2.0 ** self._exponents[name]
        if sign < 0:  # a take-back subtracts what was checked when it was added
            self._apply(acc, start, flat, factor, -1)
            return
        # Each block is checked just before it is converted, while it sits in the CPU's
        # cache: one read of the piece from memory, not two. A refused block takes the
        # blocks before it back out, so a refused piece leaves no trace.
        for lo in range(0, flat.size, _BLOCK):
            block = flat[lo : lo + _BLOCK]
            try:
                self._check(name, block)
            except PayloadError:
                self._apply(acc, start, flat[:lo], factor, -1)
                raise
            self._apply(acc, start + lo, block, factor, +1)

    def _apply(
        self, acc: Int64Array, start: int, flat: npt.NDArray[np.generic], factor: float, sign: int
    ) -> None:
        """``acc[start:] += sign * trunc(flat * factor)``, one cache-sized block at a time."""
        digits = self._digits
        for lo in range(0, flat.size, _BLOCK):
            hi = min(lo + _BLOCK, flat.size)
            d = digits[: hi - lo]
            # The one rounding: float64 product, truncated to int64 in numpy's cast loop.
            np.multiply(flat[lo:hi], factor, out=d, dtype=np.float64, casting="unsafe")
            target = acc[start + lo : start + hi]
            if sign > 0:
                np.add(target, d, out=target)
            else:
                np.subtract(target, d, out=target)

    def add(self, update: Mapping[str, npt.NDArray[np.generic]], weight: float) -> None:
        """Reserve ``weight`` and fold a whole update; refuses (and changes nothing) if an
        element is out of range."""
        for name, array in update.items():
            self.declare(name, array.shape, array.dtype)
        if set(update) != set(self._acc):
            raise ValueError(f"update tensors {sorted(update)} differ from {sorted(self._acc)}")
        for name, array in update.items():  # check all first: a refusal leaves no trace
            self._check(name, array.reshape(-1))
        self.reserve(weight)
        for name, array in update.items():
            self.fold(name, 0, array, weight, +1)

    def remove(self, update: Mapping[str, npt.NDArray[np.generic]], weight: float) -> None:
        """Take back exactly what ``add(update, weight)`` added."""
        for name, array in update.items():
            self.fold(name, 0, array, weight, -1)
        self.release(weight)

    def total(
        self,
        divisor: float = 1.0,
        dtypes: Mapping[str, np.dtype[np.generic]] | None = None,
        *,
        release: bool = False,
    ) -> dict[str, npt.NDArray[np.generic]]:
        """``sum / divisor`` per tensor in ``dtypes[name]`` (default float64; integer dtypes
        round to nearest): the int64 to float64 once, then scaled, a function of the sum
        alone. ``release``: the sum's last use; its memory goes back to the system block by
        block as it is converted, so the result and the sum (two int64 per element) are never
        held whole at once, and the sum can no longer be used."""
        if not divisor > 0:
            raise ValueError(f"divisor must be positive, got {divisor}")
        if self._released:
            raise RuntimeError("the sum was released by total(release=True)")
        self._released = release
        out: dict[str, npt.NDArray[np.generic]] = {}
        scratch = np.empty(min(_BLOCK, max((a.size for a in self._acc.values()), default=0)))
        for name, acc in self._acc.items():
            dtype = np.dtype(np.float64) if dtypes is None else dtypes[name]
            scale = 2.0 ** -self._exponents[name] / divisor
            result = np.empty(acc.size, dtype=dtype)
            for lo in range(0, acc.size, _BLOCK):
                hi = min(lo + _BLOCK, acc.size)
                v = scratch[: hi - lo]
                np.multiply(acc[lo:hi], scale, out=v, dtype=np.float64)
                if dtype.kind != "f":
                    np.rint(v, out=v)
                np.copyto(result[lo:hi], v, casting="unsafe")
                if release:
                    _drop(acc, lo, hi)
            out[name] = result.reshape(self._shapes[name])
        return out

    def digest_bytes(self) -> bytes:
        """The accumulators in name order: equal bytes, equal sums."""
        if self._released:
            raise RuntimeError("the sum was released by total(release=True)")
        return b"".join(
            name.encode() + b"\0" + acc.astype("<i8").tobytes()
            for name, acc in sorted(self._acc.items())
        )

    def _check(self, name: str, flat: npt.NDArray[np.generic]) -> None:
        """Refuse a piece with an element not finite or at the tensor's cap."""
        cap = self._caps[name]
        if flat.size == 0:
            return
        if flat.dtype in _BLAS:
            with np.errstate(over="ignore", invalid="ignore"):
                squares = float(np.dot(flat, flat))
            if squares < cap * cap / 2:  # proves every |x| < cap, NaN and Inf excluded
                return
        # max and min propagate NaN.
        extreme = max(abs(float(np.max(flat))), abs(float(np.min(flat))))
        if not math.isfinite(extreme):
            raise PayloadError(f"tensor {name!r} contains NaN or Inf; the update is refused")
        if extreme >= cap:
            raise PayloadError(
                f"tensor {name!r} holds {extreme:.3g}, beyond the exact sum's range of "
                f"+-{cap:.3g} for its dtype; the update is refused"
            )


_BLAS = (np.dtype("<f4"), np.dtype("<f8"))


def _zeros(size: int) -> Int64Array:
    """``size`` zeroed int64 in an anonymous mapping of their own, whose pages
    :func:`_drop` can give back while the rest is still in use (a small sum: plain zeros)."""
    if size * 8 < 16 * mmap.PAGESIZE or not hasattr(mmap, "MAP_PRIVATE"):
        return np.zeros(size, dtype=np.int64)
    # Private: a shared anonymous mapping is shmem, whose pages madvise would not free.
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    return np.frombuffer(mmap.mmap(-1, size * 8, flags=flags), dtype=np.int64)


def _drop(acc: Int64Array, lo: int, hi: int) -> None:
    """Give the whole pages of ``acc[lo:hi]`` back to the system (they read as zeros after);
    a no-op where ``acc`` is not a mapping of its own or there is no madvise."""
    base: object = acc.base
    mapping = base.obj if isinstance(base, memoryview) else base
    if not isinstance(mapping, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    first = -(-lo * 8 // page) * page  # whole pages only: the next block may share one
    end = len(mapping) if hi == acc.size else hi * 8 // page * page
    if end > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, end - first)
