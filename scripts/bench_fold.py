"""What the coordinator spends per element of an upload: the float add floor, the exact fold,
and the streamed fold with its take-back journal, old code and new in one process; and what a
worker spends per element of the model it receives.

One float32 update of ``--params`` elements arrives in ``--chunk-bytes`` pieces, as a streamed
upload does. Timed, best of ``--repeats`` (interleaved, so a burst of load hits every row):

* ``float_add``: ``acc += x`` (float32; the bandwidth floor of any running sum);
* ``float_weighted_add``: ``x *= w; acc += x`` (the float32 running sum exact aggregation
  replaced, ``scripts/bench_aggregate.py``);
* ``fold_old`` / ``fold_new``: ``FixedPointSum.fold`` of the old commit and of this tree (the
  finite and range check, the quantising multiply, the integer add);
* ``stream_old`` / ``stream_new``: ``UpdateStream.fold`` for every piece and ``commit`` (the
  fold plus the journal: old, every piece written to a temporary file; new, pieces kept by
  reference within the round's memory budget); ``stream_new_spilled``: the new journal with no
  memory budget (every piece written, as past the budget), its spill file reused from the last
  repeat (``SpillPool``, as round after round); ``stream_new_spilled_fresh``: the same into a
  fresh temporary file every time (a pool that keeps nothing: the spill before the pool);
* ``receive_fresh`` / ``receive_reused``: what a worker spends per element of the global
  model it receives (``PayloadAssembler``: each chunk copied into the model's buffer and
  checked finite): into a fresh buffer every round (the old code), or into last round's
  buffer again (``fedcore.buffer_pool``, the new worker).

The old code is read from git (``--old-code``, default the commit before this change) into a
temporary package, so both run in this process on the same data. Prints JSON: ns per element
and each row's ratio to ``float_add`` and ``float_weighted_add``.

    python scripts/bench_fold.py [--params 10000000] [--repeats 7] [--old-code 5814ed7]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from fedcore.buffer_pool import BufferPool
from fedcore.codec import PayloadAssembler, RawChunk, iter_chunks, make_header
from fedcore.strategy.fixed_point import FixedPointSum
from fedcore.strategy.journal import JournalBudget, SpillPool
from fedcore.strategy.streaming import UpdateStream

REPO = Path(__file__).resolve().parent.parent
_OLD_FILES = ("fedcore/strategy/fixed_point.py", "fedcore/strategy/streaming.py")
# Modules the old streaming may import relatively (absent from older commits: skipped).
_OLD_OPTIONAL = ("fedcore/strategy/journal.py",)


def load_old(ref: str, into: Path) -> tuple[ModuleType, ModuleType]:
    """The old commit's fixed_point and streaming modules, as the package ``oldstrategy``."""
    package = into / "oldstrategy"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for path in (*_OLD_FILES, *_OLD_OPTIONAL):
        shown = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{ref}:{path}"],
            check=path in _OLD_FILES,
            capture_output=True,
            text=True,
        )
        if shown.returncode == 0:
            (package / Path(path).name).write_text(shown.stdout)
    sys.path.insert(0, str(into))
    return (
        importlib.import_module("oldstrategy.fixed_point"),
        importlib.import_module("oldstrategy.streaming"),
    )


def receiver(
    update: npt.NDArray[np.float32], chunk_bytes: int, pool: BufferPool | None
) -> Callable[[], None]:
    """One received model: its chunks as the wire delivers them, assembled and checked."""
    weights = {"w": update}
    header = make_header(weights, chunk_bytes)
    # As the wire's fast path hands them over: views of the received bytes (a protobuf
    # message would copy its bytes field at every read).
    chunks = [
        RawChunk(i, memoryview(c), len(c)) for i, c in enumerate(iter_chunks(weights, chunk_bytes))
    ]

    def run() -> None:
        assembler = PayloadAssembler(
            header, max_bytes=update.nbytes, max_chunk_bytes=chunk_bytes, buffers=pool
        )
        for chunk in chunks:
            assembler.add(chunk)
        assembler.weights()

    return run


def bench(params: int, chunk_bytes: int, repeats: int, old_ref: str) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    update = rng.normal(0.0, 0.05, params).astype(np.float32)
    per_chunk = chunk_bytes // 4
    # Received chunks: read-only views of bytes, as StreamedUpload makes them.
    received = [
        np.frombuffer(update[lo : lo + per_chunk].tobytes(), np.float32)
        for lo in range(0, params, per_chunk)
    ]
    weight = 537.0
    acc32 = np.zeros(params, np.float32)
    scratch = np.empty(per_chunk, np.float32)

    def float_add() -> None:
        for i, piece in enumerate(received):
            target = acc32[i * per_chunk : i * per_chunk + piece.size]
            np.add(target, piece, out=target)

    def float_weighted_add() -> None:
        for i, piece in enumerate(received):
            scaled = scratch[: piece.size]
            np.multiply(piece, np.float32(weight), out=scaled)
            target = acc32[i * per_chunk : i * per_chunk + piece.size]
            np.add(target, scaled, out=target)

    def folder(module: Any) -> Callable[[], None]:
        total = module.FixedPointSum(1e6)
        total.declare("w", (params,), np.dtype(np.float32))
        total.reserve(weight)

        def run() -> None:
            for i, piece in enumerate(received):
                total.fold("w", i * per_chunk, piece, weight, +1)

        return run

    def streamer(module: Any, **journal: Any) -> Callable[[], None]:
        total = module.FixedPointSum(1e9)
        total.declare("w", (params,), np.dtype(np.float32))

        def run() -> None:
            stream = module.UpdateStream(total, weight, **journal)
            for i, piece in enumerate(received):
                stream.fold("w", i * per_chunk, piece)
            stream.commit()

        return run

    with tempfile.TemporaryDirectory() as tmp:
        old_fixed, old_streaming = load_old(old_ref, Path(tmp))
        new = sys.modules[__name__]
        rows: dict[str, Callable[[], None]] = {
            "float_add": float_add,
            "float_weighted_add": float_weighted_add,
            "fold_old": folder(old_fixed),
            "fold_new": folder(new),
            "stream_old": streamer(old_streaming, journal_dir=None),
            "stream_new": streamer(new),
            "stream_new_spilled": streamer(new, journal=JournalBudget(0, pool=SpillPool())),
            "stream_new_spilled_fresh": streamer(
                new, journal=JournalBudget(0, pool=SpillPool(keep_bytes=0, keep_files=0))
            ),
            "receive_fresh": receiver(update, chunk_bytes, None),
            "receive_reused": receiver(update, chunk_bytes, BufferPool()),
        }
        best = dict.fromkeys(rows, float("inf"))
        for _ in range(repeats):
            for label, run in rows.items():
                started = time.perf_counter()
                run()
                best[label] = min(best[label], time.perf_counter() - started)
    ns = {label: seconds / params * 1e9 for label, seconds in best.items()}
    return {
        label: {
            "ns_per_element": round(value, 3),
            "x_float_add": round(value / ns["float_add"], 2),
            "x_float_weighted_add": round(value / ns["float_weighted_add"], 2),
        }
        for label, value in ns.items()
    }


# The new tree's classes, under the names ``folder``/``streamer`` look up on a module.
__all__ = ["FixedPointSum", "UpdateStream"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=int, default=10_000_000)
    p.add_argument("--chunk-bytes", type=int, default=2 * 1024 * 1024)
    p.add_argument("--repeats", type=int, default=7, help="best of this many runs")
    p.add_argument("--old-code", default="5814ed7", help="git ref of the old code")
    args = p.parse_args()
    rows = bench(args.params, args.chunk_bytes, args.repeats, args.old_code)
    print(
        json.dumps(
            {
                "params": args.params,
                "chunk_bytes": args.chunk_bytes,
                "old_code": args.old_code,
                "cpus": os.cpu_count(),
                "load_avg": os.getloadavg(),
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
