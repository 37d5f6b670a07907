"""The gRPC server's own limits: streams per connection, connection idle time and age, and
concurrent RPCs in total.

gRPC enforces these below the handler, so a peer that never sends a fedcore message is still
bounded:

* ``grpc.max_concurrent_streams``: streams one HTTP/2 connection may have open; a worker uses
  one ``Join`` stream (and a health check now and then), so a small number costs it nothing
  while one connection cannot multiplex hundreds of silent streams.
* ``grpc.max_connection_idle_ms``: a connection with no RPC for this long is closed (a worker
  always has its ``Join`` stream open, so only abandoned or probing connections are idle).
* ``grpc.max_connection_age_ms``: after this long a connection is told to stop opening new
  streams (GOAWAY); the streams it has keep running (the grace period is unlimited), so a
  worker's session is never cut, but one connection cannot live on for new streams forever.
* ``maximum_concurrent_rpcs``: the whole server refuses RPCs beyond joined workers plus
  pending handshakes plus a few health checks.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["HEALTH_CHECK_ALLOWANCE", "grpc_limit_options", "max_concurrent_rpcs"]

#: RPCs besides Join streams the server keeps room for (health checks, probes).
HEALTH_CHECK_ALLOWANCE = 16


class _Limits(Protocol):
    max_workers: int
    max_pending_handshakes: int
    max_streams_per_connection: int
    max_connection_idle: float
    max_connection_age: float


def grpc_limit_options(config: _Limits) -> list[tuple[str, int]]:
    """Channel arguments for ``grpc.aio.server(options=...)``; a 0 duration leaves that limit
    off."""
    options = [("grpc.max_concurrent_streams", config.max_streams_per_connection)]
    if config.max_connection_idle > 0:
        options.append(("grpc.max_connection_idle_ms", int(config.max_connection_idle * 1000)))
    if config.max_connection_age > 0:
        options.append(("grpc.max_connection_age_ms", int(config.max_connection_age * 1000)))
    return options


def max_concurrent_rpcs(config: _Limits) -> int:
    """RPCs the server runs at once: every worker's stream, every pending handshake, and a
    few health checks."""
    return config.max_workers + config.max_pending_handshakes + HEALTH_CHECK_ALLOWANCE
