"""HTTP/2 flow control of the coordinator's gRPC server: how many bytes a worker may send
ahead of what the coordinator has read.

A stream may have at most its flow-control window of bytes in flight. Whatever arrived within
the window but was not yet read sits in gRPC core's buffers: memory the coordinator holds for
each upload in flight. The coordinator reads a stream's next chunk only once the last one is
folded (``server/transport/service.py`` awaits the fold before reading again), so a stream
never holds more unread bytes than its window plus the message being read.

**Default (``--stream-window`` 4 MiB): a fixed window, BDP probing off.** A stream may have
4 MiB in flight past what the coordinator read, plus the message being read: with N uploads
in flight the coordinator holds at most N x (4 MiB + chunk) unread, however fast the links.
4 MiB per round trip fills a 100 Mbit/s link up to a 320 ms round trip (2.5 MB in flight at
200 ms) while the coordinator folds the last chunk. 1 MiB held such a link at 200 ms to 1.43x
the bare echo (4 MiB: 1.03x), for 0.8 model less on loopback (3.5 against 4.3 models above
the baseline at N = 8, d = 1e7; docs/benchmarks.md). ``--stream-window 0`` is gRPC's own 64 KiB: one message per round trip,
which held such a link to 1.24x the bare echo (docs/benchmarks.md).

**``--stream-window BYTES``: a fixed window for long fat links.** To fill a link one stream
needs a window of at least its bandwidth-delay product (1 Gbit/s x 200 ms: 25 MB), which the
default does not give (about 4 MiB per 200 ms round trip: 20 MB/s). A fixed window
of that size fills such a link, at a stated cost: up to N x BYTES unread on the coordinator
while it reads slower than the links deliver.

Why not gRPC's BDP probing (the previous default): it sizes each connection's window from its
measured bandwidth-delay product, and on a coordinator starved of CPU the measured round trip
is the coordinator's own delay, so the windows grew to several MiB per stream on loopback
(8.0 to 10.8 models above the baseline at N = 8, d = 1e7, against 5.3 to 5.7 with probing
off; docs/benchmarks.md), while over 100 Mbit/s x 50 ms links the 1 MiB window does about as
well (1.026x the echo against 1.009x, with 1 MiB). gRPC Python exposes no coordinator-wide memory quota,
and BDP probing ignores ``grpc.http2.lookahead_bytes``, so the bound is per stream, set here.

The worker's channel keeps BDP probing (:data:`FLOW_CONTROL_OPTIONS`): it receives one stream,
the global model, so its window costs it one window and lets downloads fill long fat links.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_STREAM_WINDOW",
    "FLOW_CONTROL_OPTIONS",
    "MAX_STREAM_WINDOW",
    "server_flow_control",
]

#: Channel arguments of the worker's channel: BDP probing (gRPC's default, stated here).
FLOW_CONTROL_OPTIONS: list[tuple[str, int]] = [("grpc.http2.bdp_probe", 1)]

#: ``--stream-window`` default: enough for 100 Mbit/s links up to a 320 ms round trip.
DEFAULT_STREAM_WINDOW = 4 * 1024 * 1024
#: The largest HTTP/2 window (RFC 9113, 6.9.1: 2**31 - 1), rounded down to a MiB.
MAX_STREAM_WINDOW = 2047 * 1024 * 1024


def server_flow_control(stream_window: int = DEFAULT_STREAM_WINDOW) -> list[tuple[str, int]]:
    """The coordinator server's flow-control channel arguments for ``--stream-window``."""
    if not 0 <= stream_window <= MAX_STREAM_WINDOW:
        raise ValueError(f"the stream window must be 0..{MAX_STREAM_WINDOW}, got {stream_window}")
    options = [("grpc.http2.bdp_probe", 0)]
    if stream_window:
        options.append(("grpc.http2.lookahead_bytes", stream_window))
    return options
