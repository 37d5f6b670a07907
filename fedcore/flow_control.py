"""HTTP/2 flow control of fedcore's gRPC connections: one place for both sides' windows.

A stream may have at most its flow-control window of bytes in flight, so to fill a link one
stream needs a window of at least the link's bandwidth-delay product (1 Gbit/s x 200 ms:
25 MB). gRPC's default window with BDP probing off (64 KiB, grown to about one message while a
handler waits for it) held one upload to 4.7-5 MB/s on such a link.

Both the coordinator's server and the worker's channel run with **BDP probing** on: gRPC
measures each connection's bandwidth-delay product with pings and sizes the window from it,
about ``max(4 MiB, 2 x estimated BDP)`` while its memory quota is far from full, down to
``2 x BDP`` and below as the quota fills (``TargetInitialWindowSizeBasedOnMemoryPressureAndBdp``
in gRPC's ``chttp2/transport/flow_control.cc``). One upload then fills 1 Gbit/s x 200 ms, and
rounds over 100 Mbit/s x 50 ms links got faster too (docs/benchmarks.md).

What it costs the coordinator: a window is memory only while the coordinator reads slower
than a link delivers. Uploads stream (each chunk read and folded as it arrives, none waits for
a slot), so the windows are the bound: N x max(4 MiB, 2 x estimated BDP), which the operator
cannot set, and which grew on a coordinator starved of CPU (5.8 and 10.3 models above the
baseline at N = 8, d = 1e7 on loopback in two loaded runs, 4.6 with BDP probing off). A fixed
32 MiB window (``grpc.http2.lookahead_bytes``) was measured too and is worse there: 17.7 models.
"""

from __future__ import annotations

__all__ = ["FLOW_CONTROL_OPTIONS"]

#: Channel arguments for the coordinator's server and the worker's channel (gRPC's default,
#: stated so that the choice is in one place).
FLOW_CONTROL_OPTIONS: list[tuple[str, int]] = [("grpc.http2.bdp_probe", 1)]
