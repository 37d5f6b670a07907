"""HTTP/2 flow control of fedcore's gRPC connections, one setting for both sides.

A stream may have at most its flow-control window of bytes in flight; to fill a link one
stream needs a window of at least the link's bandwidth-delay product (1 Gbit/s x 200 ms: 25 MB).
gRPC's fixed default window (64 KiB, grown to about one message while a handler waits for it)
held one upload to 4.7 MB/s on such a link. With **BDP probing** on, gRPC measures each
connection's bandwidth-delay product with pings and sizes the window from it: about
``max(4 MiB, 2 x BDP)`` while its memory quota is far from full, down to ``2 x BDP`` and
then to almost nothing as the quota fills (``TargetInitialWindowSizeBasedOnMemoryPressureAndBdp``
in gRPC's ``chttp2/transport/flow_control.cc``). One stream then fills 1 Gbit/s x 200 ms
(``scripts/bench_window.py``, docs/benchmarks.md).

What it costs the coordinator: a window is memory only while the coordinator reads slower
than the link delivers. Uploads are read and folded as their chunks arrive
(:mod:`fedcore.strategy.streaming`), none waits for a slot, so the bound is N x window: on
loopback (BDP near zero) N x 4 MiB, on a 1 Gbit/s x 200 ms link about N x 50 MB, and never
above what gRPC's memory quota allows. It was off while staged uploads waited for one upload
slot, each then parking a whole window unread.
"""

from __future__ import annotations

__all__ = ["FLOW_CONTROL_OPTIONS"]

#: Channel arguments for the coordinator's server and the worker's channel (gRPC's default,
#: stated so that the choice is one place and tested).
FLOW_CONTROL_OPTIONS: list[tuple[str, int]] = [("grpc.http2.bdp_probe", 1)]
