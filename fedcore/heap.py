"""Keep a long-lived process's heap from holding on to freed model-sized buffers.

glibc serves a large allocation from ``mmap`` and returns it to the system when freed, but
its *dynamic* mmap threshold rises to the size of every such block freed (up to 32 MiB):
after the first round, payload chunks and message buffers of a few MiB come from the heap
instead, where freed memory stays in the process. A coordinator that streams models in 2 MiB
chunks to many workers then grows by tens of MB per stream. Fixing the thresholds (as
``MALLOC_MMAP_THRESHOLD_`` would) keeps its memory at what it actually holds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["return_freed_memory"]

log = logging.getLogger("fedcore")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1024 * 1024


def return_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds at 1 MiB; False where there is no glibc."""
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
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _THRESHOLD)
    )
    log.debug("malloc thresholds fixed at %d bytes: %s", _THRESHOLD, ok)
    return ok
