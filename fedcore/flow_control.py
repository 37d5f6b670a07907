"""HTTP/2 flow control of fedcore's gRPC connections: one place for both sides' windows.

A stream may have at most its flow-control window of bytes in flight, so to fill a link one
stream needs a window of at least the link's bandwidth-delay product (1 Gbit/s x 200 ms:
25 MB). gRPC's default window with BDP probing off (64 KiB, grown to about one message while a
handler waits for it) held one upload to 4.7-5 MB/s on such a link.

**The coordinator** receives the uploads: a fixed window of :data:`UPLOAD_WINDOW_BYTES`
(32 MiB, ``grpc.http2.lookahead_bytes``) with BDP probing off. 32 MiB / 0.2 s = 168 MB/s, so
one stream fills 1 Gbit/s x 200 ms. The window is memory only while the coordinator reads
slower than a link delivers (uploads stream: each chunk is read and folded as it arrives,
none waits for a slot), and never more than N x 32 MiB for N uploads at once. BDP probing was
tried and not kept: it sizes each window at ``max(4 MiB, 2 x estimated BDP)`` while gRPC's
memory quota is far from full, and on a coordinator starved of CPU the estimate grew with the
delay of its ping acknowledgements (10.3 models above the baseline against 4.6 at N = 8,
d = 1e7 on loopback, docs/benchmarks.md): no bound fedcore can state.

**The worker** receives the global model: its channel keeps gRPC's default, BDP probing on
(downloads were never window-bound, ``scripts/bench_window.py``); a worker holds one stream.
"""

from __future__ import annotations

__all__ = ["SERVER_FLOW_CONTROL", "UPLOAD_WINDOW_BYTES", "WORKER_FLOW_CONTROL"]

#: Each upload stream's flow-control window on the coordinator.
UPLOAD_WINDOW_BYTES = 32 * 1024 * 1024

#: Channel arguments of the coordinator's gRPC server.
SERVER_FLOW_CONTROL: list[tuple[str, int]] = [
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", UPLOAD_WINDOW_BYTES),
]

#: Channel arguments of the worker's channel (gRPC's default, stated so the choice is here).
WORKER_FLOW_CONTROL: list[tuple[str, int]] = [("grpc.http2.bdp_probe", 1)]
