"""HTTP/2 flow control of the coordinator's gRPC server: how much a worker may send unread.

One stream moves at most its receive window per round trip. gRPC's default window with BDP
probing off stays near one message (a 2 MiB chunk, granted as the handler asks for it), which
caps an upload at about 2 MiB per round trip: 3 MB/s through a 1 Gbit/s link of 200 ms
(``scripts/bench_window.py``), 40x below the link. A window as large as the link's
bandwidth-delay product lets one stream fill it; the window is also the most a connection can
buffer in this process while its stream is not being read, so it is fixed (not grown by BDP
probing, which on loopback grows it with the scheduling delay, not with any link), and sized for
the largest link fedcore is tuned for: 1 Gbit/s x 200 ms = 25 MB in flight.
"""

from __future__ import annotations

from typing import Final

__all__ = ["FLOW_CONTROL_OPTIONS", "STREAM_WINDOW_BYTES"]

#: A stream's (and its connection's) receive window: 1 Gbit/s x 200 ms = 25 MB, rounded up.
STREAM_WINDOW_BYTES: Final = 32 * 1024 * 1024

#: gRPC server options: a fixed window of :data:`STREAM_WINDOW_BYTES`, no BDP probing.
FLOW_CONTROL_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
)
