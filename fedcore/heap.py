"""Keep a long-lived process's heap from holding on to freed model-sized buffers.

glibc serves a large allocation from ``mmap`` and returns it to the system when freed, but
its *dynamic* mmap threshold rises to the size of every such block freed (up to 32 MiB):
after the first round, payload chunks and message buffers of a few MiB come from the heap
instead, where freed memory stays in the process. A coordinator that streams models in 2 MiB
chunks to many workers then grows by tens of MB per stream. Fixing the thresholds (as
``MALLOC_MMAP_THRESHOLD_`` would) keeps its memory at what it actually holds.

The threshold sits just above one chunk message: below it, every chunk message (those gRPC
receives and those sent) would be a fresh ``mmap`` whose pages fault in one by one as they are
written, which cost a third of a round at d=1e7, N=8 (``scripts/bench_overhead.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["return_freed_memory", "threshold_for"]

log = logging.getLogger("fedcore")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: malloc arenas: gRPC's threads and the fold's worker threads each got one of their own (up
#: to 8 per core), each keeping freed chunk buffers: 2 models of the coordinator's peak at
#: N = 8, d = 1e7 (docs/benchmarks.md). One arena: the allocations that matter are a few large
#: buffers per chunk, so threads seldom wait on its lock.
_ARENAS = 1
_MIN_THRESHOLD = 1024 * 1024
_MAX_THRESHOLD = 32 * 1024 * 1024  # glibc's largest mmap threshold on 64-bit systems


def threshold_for(message_bytes: int) -> int:
    """The smallest power of two above ``message_bytes``, within glibc's bounds."""
    return min(_MAX_THRESHOLD, max(_MIN_THRESHOLD, 1 << message_bytes.bit_length()))


def return_freed_memory(message_bytes: int) -> bool:
    """Fix glibc's mmap and trim thresholds just above ``message_bytes`` (the largest message
    the process handles, see :func:`threshold_for`) and cap its arenas (call it before any
    thread starts); False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    threshold = threshold_for(message_bytes)
    ok = (
        bool(mallopt(_M_MMAP_THRESHOLD, threshold))
        and bool(mallopt(_M_TRIM_THRESHOLD, threshold))
        and bool(mallopt(_M_ARENA_MAX, _ARENAS))
    )
    log.debug("malloc thresholds fixed at %d bytes: %s", threshold, ok)
    return ok
