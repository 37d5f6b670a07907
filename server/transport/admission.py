"""How many streams may wait for their hello at once, and how fast one host may open them.

A stream that has not sent its hello yet has proven nothing, yet costs memory and a task for up
to ``--handshake-timeout`` seconds. :class:`HandshakeGate` bounds how many such streams are
open at once (in total and per peer host) and how fast one host may open new ones (a token
bucket), so a flood of silent or reopened streams is refused with ``RESOURCE_EXHAUSTED``
(workers retry that with backoff) instead of piling up. Its limits are
:class:`~fedcore.server.state.limits.GateLimits`.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fedcore.tls import host_of

from ..state.limits import GateLimits

__all__ = ["HandshakeGate", "HandshakeRefused", "peer_host"]

# Per-host buckets kept at most; the oldest are forgotten first (a full bucket is the state a
# forgotten host starts in anyway, so forgetting only ever loosens the limit for a quiet host).
_MAX_TRACKED_HOSTS = 4096


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``, ``unix:...``)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and rest:
        return host_of(rest)
    return peer


class HandshakeRefused(Exception):
    """The gate refused a new stream; the message says which limit."""


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class HandshakeGate:
    """Counts streams waiting for their hello; refuses those over the limits."""

    def __init__(self, limits: GateLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._pending: collections.Counter[str] = collections.Counter()
        self._buckets: collections.OrderedDict[str, _Bucket] = collections.OrderedDict()
        self.refused = 0

    @property
    def pending(self) -> int:
        """Streams admitted that have not finished their handshake."""
        return sum(self._pending.values())

    def _take_token(self, host: str) -> bool:
        limits = self.limits
        if limits.rate_per_host <= 0:
            return True
        now = self._clock()
        bucket = self._buckets.pop(host, None) or _Bucket(float(limits.burst_per_host), now)
        bucket.tokens = min(
            float(limits.burst_per_host),
            bucket.tokens + (now - bucket.stamp) * limits.rate_per_host,
        )
        bucket.stamp = now
        self._buckets[host] = bucket  # most recently used last
        while len(self._buckets) > _MAX_TRACKED_HOSTS:
            self._buckets.popitem(last=False)
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    @contextmanager
    def admit(self, peer: str) -> Iterator[None]:
        """Hold a pending-handshake place for ``peer`` for the ``with`` block; raises
        :class:`HandshakeRefused` when a limit is reached."""
        host = peer_host(peer)
        limits = self.limits
        problem = None
        if not self._take_token(host):
            problem = (
                f"too many new streams from {host} (over {limits.rate_per_host:g}/s); retry later"
            )
        elif self.pending >= limits.max_pending:
            problem = f"too many streams are waiting for their hello ({limits.max_pending})"
        elif self._pending[host] >= limits.max_pending_per_host:
            problem = (
                f"too many streams from {host} are waiting for their hello "
                f"({limits.max_pending_per_host})"
            )
        if problem is not None:
            self.refused += 1
            raise HandshakeRefused(problem)
        self._pending[host] += 1
        try:
            yield
        finally:
            self._pending[host] -= 1
            if self._pending[host] <= 0:
                del self._pending[host]
