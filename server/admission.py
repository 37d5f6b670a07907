"""Who may open a stream, and how many may wait for their hello at once.

Two rules, both applied before a stream has proven anything:

* :func:`require_authentication_off_loopback`: a coordinator that other machines can reach
  checks identities (``--enrolled`` tokens or mutual TLS). TLS alone only encrypts: without a
  proof of identity anyone who reaches the port could join under any free name and send
  updates, so it is refused unless the operator says ``--insecure``.
* :class:`HandshakeGate`: a stream that has not sent its hello yet costs memory and a task
  for up to ``--handshake-timeout`` seconds. The gate bounds how many such streams are open at
  once (in total and per peer host) and how fast one host may open new ones (a token bucket),
  so a flood of silent or reopened streams is refused with ``RESOURCE_EXHAUSTED`` (workers
  retry that with backoff) instead of piling up.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fedcore.errors import ConfigError
from fedcore.tls import host_of, is_loopback

__all__ = [
    "GateLimits",
    "HandshakeGate",
    "HandshakeRefused",
    "peer_host",
    "require_authentication_off_loopback",
]

# Per-host buckets kept at most; the oldest are forgotten first (a full bucket is the state a
# forgotten host starts in anyway, so forgetting only ever loosens the limit for a quiet host).
_MAX_TRACKED_HOSTS = 4096


def require_authentication_off_loopback(
    listen: str, *, enrolled: bool, mutual_tls: bool, insecure: bool
) -> None:
    """Refuse to serve other machines without a proof of worker identity (``--insecure``
    overrides)."""
    if enrolled or mutual_tls or insecure or is_loopback(host_of(listen)):
        return
    raise ConfigError(
        f"refusing to serve {listen!r}, which other machines can reach, without worker "
        "authentication: anyone reaching it could join under any name. Give --enrolled "
        "(tokens from `fed-certs`) and/or --tls-client-ca (mutual TLS), listen on 127.0.0.1, "
        "or pass --insecure if the network itself admits only your workers"
    )


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``, ``unix:...``)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and rest:
        return host_of(rest)
    return peer


class HandshakeRefused(Exception):
    """The gate refused a new stream; the message says which limit."""


@dataclass(frozen=True)
class GateLimits:
    """The gate's limits (see ``fed-server --help``, "timeouts and limits")."""

    max_pending: int = 128
    max_pending_per_host: int = 32
    #: New streams per second one host may open on average (0: unlimited)...
    rate_per_host: float = 20.0
    #: ...and at once after a quiet period.
    burst_per_host: int = 100

    def __post_init__(self) -> None:
        if self.max_pending < 1 or self.max_pending_per_host < 1:
            raise ConfigError("--max-pending-handshakes and its per-host limit must be at least 1")
        if self.rate_per_host < 0:
            raise ConfigError("--handshake-rate cannot be negative (0 turns it off)")
        if self.burst_per_host < 1:
            raise ConfigError("--handshake-burst must be at least 1")


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
