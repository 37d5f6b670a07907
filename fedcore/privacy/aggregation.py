"""The DP wrapper's aggregator: a sum of unit-weight deltas, each clipped by the coordinator.

Clipping needs an update's whole L2 norm before any of it may be scaled, and a worker's own
claim of its norm could lie, so the coordinator computes it from the values it received. An
update may still stream: its chunks are spooled to an unlinked temporary file as they arrive
(:mod:`fedcore.strategy.spool`); when the last one is in, the norm is computed from the
spool (in the upload's worker thread), and at commit the update is read back range by range,
scaled and added to the float64 sum. The coordinator holds the sum and one range, never an
update (memory O(model) however many uploads are in flight); the disk holds one model per
upload in flight. An update cut off or refused part-way never reached the sum: its file is
deleted. A whole update (``add``) goes through the same functions, so the two paths give the
same bits.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt

from fedcore.errors import PayloadError
from fedcore.strategy import PieceSink, StreamingAggregator
from fedcore.strategy.spool import RANGE_BYTES, SpooledUpdate
from fedcore.weights import Weights

__all__ = ["UniformDeltaAggregator", "clip_scale"]

Layout = dict[str, tuple[tuple[int, ...], np.dtype[np.generic]]]
#: Elements ``lo..hi`` of a tensor of the update, flat, in its dtype.
Reader = Callable[[str, int, int], npt.NDArray[np.generic]]
Float64Array = npt.NDArray[np.float64]
#: float64 elements of a delta handled at a time.
_STEP = RANGE_BYTES // 8


def clip_scale(blocks: Callable[[], Iterator[Float64Array]], clip_norm: float) -> float:
    """The factor that brings the vector made of ``blocks()`` to L2 norm at most
    ``clip_norm``: 1 when it is within, else ``clip_norm / norm`` shrunk until the scaled
    float64 values satisfy the bound (as :func:`~.clipping.clip_update` does). The norm is
    the exactly rounded sum (``fsum``) of the blocks' sums of squares, so it depends on the
    blocks only, not on how an upload was cut into chunks."""
    norm = math.sqrt(math.fsum(_squares(b) for b in blocks()))
    if not math.isfinite(norm):
        raise PayloadError("the update's L2 norm overflows; the update is refused")
    if norm <= clip_norm:
        return 1.0
    scale = clip_norm / norm
    shrink = 1e-7
    for _ in range(64):
        scaled = math.sqrt(math.fsum(_squares(b * scale) for b in blocks()))
        if scaled <= clip_norm:
            return scale
        scale *= 1.0 - shrink
        shrink = min(2 * shrink, 0.5)
    raise AssertionError("clipping did not converge")  # pragma: no cover


def _squares(block: Float64Array) -> float:
    # einsum's own loop, not BLAS: a threaded BLAS dot crawls on a loaded machine.
    return float(np.einsum("i,i->", block, block))


class UniformDeltaAggregator(StreamingAggregator):
    """Sums deltas from the global weights, each update weighing 1 (bounded weights).

    ``presummed=True`` is for secure aggregation, where the aggregator receives one update —
    the mean of ``num_examples`` unit-weight updates — instead of one per worker. With
    ``enforce_clip`` (central mode without secure aggregation, where single updates are
    visible) the coordinator clips each delta again, so a worker that skips clipping gains
    nothing. Updates stream through a spool (see the module doc).
    """

    def __init__(
        self,
        global_weights: Weights,
        *,
        presummed: bool = False,
        enforce_clip: float | None = None,
        spool_dir: str | None = None,
    ) -> None:
        self._global = global_weights
        self._presummed = presummed
        self._enforce_clip = enforce_clip
        self._spool_dir = spool_dir
        self._floats = [name for name, base in global_weights.items() if base.dtype.kind == "f"]
        self._sum: dict[str, Float64Array] = {}
        self._open: set[PieceSink] = set()
        self._lock = threading.Lock()
        self._count = 0
        self.units = 0  # unit-weight updates folded in (n)

    @property
    def count(self) -> int:
        return self._count

    def expect(self, total_weight: float) -> None:
        """Every update weighs 1: the example counts budget nothing here."""

    def open(self, layout: Layout, num_examples: int) -> PieceSink:
        if self._presummed:
            raise ValueError("a presummed (securely aggregated) update arrives whole")
        expected = {name: (base.shape, base.dtype) for name, base in self._global.items()}
        got = {name: (tuple(shape), np.dtype(dtype)) for name, (shape, dtype) in layout.items()}
        if got != expected:
            raise ValueError("a streamed update must have the global model's tensors")
        stream = _ClippedStream(self, SpooledUpdate(layout, spool_dir=self._spool_dir))
        self._open.add(stream)
        return stream

    def commit(self, stream: PieceSink, num_examples: int) -> bool:
        self._open.discard(stream)
        if not isinstance(stream, _ClippedStream):
            raise TypeError("a stream this aggregator did not open cannot be committed")
        return stream.commit()

    def add(self, update: Weights, num_examples: int, *, staleness: int = 0) -> None:
        units = num_examples if self._presummed else 1
        if units < 1:
            raise ValueError("an update must stand for at least one worker")

        def read(name: str, lo: int, hi: int) -> npt.NDArray[np.generic]:
            return update[name].reshape(-1)[lo:hi]

        self._fold(read, self.scale_of(read), units)

    def scale_of(self, read: Reader) -> float:
        """The clip factor of the update ``read`` returns (1 without an enforced clip)."""
        if self._enforce_clip is None:
            return 1.0
        return clip_scale(lambda: (d for _, _, d in self._deltas(read)), self._enforce_clip)

    def _deltas(self, read: Reader) -> Iterator[tuple[str, int, Float64Array]]:
        """(tensor, first element, float64 delta from the global weights) of every range."""
        for name in self._floats:
            base = self._global[name].reshape(-1)
            for lo in range(0, base.size, _STEP):
                hi = min(lo + _STEP, base.size)
                yield name, lo, np.subtract(read(name, lo, hi), base[lo:hi], dtype=np.float64)

    def _fold(self, read: Reader, scale: float, units: int) -> None:
        with self._lock:
            for name, lo, delta in self._deltas(read):
                if scale != 1.0:
                    delta *= scale
                if units != 1:
                    delta *= units
                total = self._sum.get(name)
                if total is None:
                    total = self._sum[name] = np.zeros(self._global[name].size)
                np.add(total[lo : lo + delta.size], delta, out=total[lo : lo + delta.size])
            self.units += units
            self._count += 1

    def delta_sum(self) -> dict[str, np.ndarray]:
        """The sum of the unit-weight deltas (float64, shaped as the tensors)."""
        return {name: s.reshape(self._global[name].shape) for name, s in self._sum.items()}

    def result(self) -> Weights:
        """Global weights plus the mean delta (without noise; the wrapper adds it)."""
        for stream in self._open:  # an upload still under way never counts
            stream.abort()
        self._open.clear()
        if self.units == 0:
            raise ValueError("no updates to aggregate")
        out: Weights = {}
        sums = self.delta_sum()
        for name, base in self._global.items():
            total = sums.get(name)
            if total is None:
                out[name] = base.copy()
            else:
                out[name] = np.add(base, total / self.units, dtype=np.float64).astype(base.dtype)
        return out


class _ClippedStream:
    """One streamed update: spooled as it arrives, its clip factor computed when complete
    (in the thread that folded the last piece), read back into the sum at commit."""

    def __init__(self, owner: UniformDeltaAggregator, spool: SpooledUpdate) -> None:
        self._owner = owner
        self._spool = spool
        self._scale: float | None = None

    def fold(self, name: str, start: int, values: npt.NDArray[np.generic]) -> bool:
        if not self._spool.fold(name, start, values):
            return False
        if self._spool.complete and self._scale is None:
            try:
                self._scale = self._owner.scale_of(self._read)
            except ValueError:
                if self._spool.state == "open":
                    raise
                return False  # aborted meanwhile (the round ended): nothing to count
        return True

    def _read(self, name: str, lo: int, hi: int) -> npt.NDArray[np.generic]:
        return self._spool.read(name, lo, hi - lo)

    def commit(self) -> bool:
        if not self._spool.commit():
            return False
        try:
            scale = self._scale if self._scale is not None else self._owner.scale_of(self._read)
            self._owner._fold(self._read, scale, 1)
        finally:
            self._spool.close()
        return True

    def abort(self) -> None:
        self._spool.abort()
