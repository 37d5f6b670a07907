"""Per-stream throughput through one emulated link, for sets of HTTP/2 flow-control options.

One bare grpc.aio server (its options: one ``--options`` set), one client behind a link of
scripts/wanlink.py (default 1 Gbit/s each way, 200 ms round trip: 25 MB in flight). On one
stream the client uploads ``--megabytes`` in messages of fedcore's chunk size and waits for the
server's acknowledgement (the server reads as fast as it can, as a coordinator folding chunks
does), then downloads as much. Throughput = bytes / (time - one round trip). The client's
channel uses gRPC's defaults plus the message limits, like a worker's. The link's peak buffer
and the server's peak memory are reported too: a larger window must not mean unbounded
buffering.

    bench_window.py [--options today window-32m bdp] [--rtt-ms 200] [--rate-mbit 1000]
                    [--megabytes 200] [--out F]
    bench_window.py server --options NAME     # internal: the server process
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import BenchError, Child, neutral_folder, proc_status, python
from wanlink import Link, LinkSpec

SCRIPT = Path(__file__).resolve()
METHOD = "/fedcore.bench.Window/Probe"
LISTENING = "listening on "
CHUNK = 2 * 1024 * 1024  # fedcore.protocol.DEFAULT_CHUNK_BYTES (no torch import here)
_LIMITS = [
    ("grpc.max_receive_message_length", CHUNK + 1024 * 1024),
    ("grpc.max_send_message_length", CHUNK + 1024 * 1024),
]


# The server's flow-control options under test. "today": the coordinator's until issue 28 (no
# BDP probing, so gRPC's default window, which grows to one message while the handler waits for
# it); "window-32m": a fixed 32 MiB window (1 Gbit/s x 200 ms = 25 MB in flight); "bdp": gRPC's
# defaults (BDP probing grows the window with the measured bandwidth-delay product), the
# coordinator's since (fedcore/flow_control.py).
OPTIONS: dict[str, list[tuple[str, int]]] = {
    "today": [("grpc.http2.bdp_probe", 0)],
    "window-32m": [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 32 << 20)],
    "bdp": [],
}


async def _serve(options: list[tuple[str, int]]) -> None:
    async def probe(request_iterator: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        header = await context.read()
        upload, download = json.loads(header)
        got = 0
        while got < upload:
            message = await context.read()
            got += len(message)
        yield b"ack"
        message = bytes(CHUNK)
        sent = 0
        while sent < download:
            part = message[: min(CHUNK, download - sent)]
            yield part
            sent += len(part)
        print("peak " + json.dumps(proc_status(os.getpid()).get("VmHWM", 0)), flush=True)

    server = grpc.aio.server(options=[*_LIMITS, *options])
    service, method = METHOD.strip("/").split("/")
    handler = grpc.stream_stream_rpc_method_handler(probe)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service, {method: handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"{LISTENING}127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


async def _measure(address: str, spec: LinkSpec, total: int) -> dict[str, Any]:
    """Upload then download ``total`` bytes on one stream; seconds and MB/s of each."""
    host, _, port = address.rpartition(":")
    link = Link((host, int(port)), spec)
    link_port = await link.start()
    rtt = spec.up.delay_s + spec.down.delay_s
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{link_port}", options=_LIMITS) as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            call: Any = channel.stream_stream(METHOD, None, None)(None)
            await call.write(json.dumps([total, total]).encode())
            message = bytes(CHUNK)
            started = time.perf_counter()
            sent = 0
            while sent < total:
                part = message[: min(CHUNK, total - sent)]
                await call.write(part)
                sent += len(part)
            ack = await call.read()
            if ack != b"ack":
                raise BenchError(f"the server answered {ack!r}")
            up_s = time.perf_counter() - started
            started = time.perf_counter()
            got = 0
            while got < total:
                part = await call.read()
                if part is grpc.aio.EOF:  # type: ignore[attr-defined]
                    raise BenchError(f"the download ended after {got} bytes")
                got += len(part)
            down_s = time.perf_counter() - started
            await call.done_writing()
    finally:
        await link.close()

    def rate(seconds: float) -> float:
        return round(total / max(seconds - rtt, 1e-9) / 1e6, 2)

    return {
        "upload_seconds": round(up_s, 3),
        "download_seconds": round(down_s, 3),
        "upload_MBps": rate(up_s),
        "download_MBps": rate(down_s),
        "link_capacity_MBps": round(spec.up.rate_bps / 8e6, 2),
        "link_peak_buffered_bytes": {"up": link.up.peak_buffered, "down": link.down.peak_buffered},
        "link_buffer_capacity_bytes": link.up.capacity,
        "client_peak_rss_bytes": proc_status(os.getpid()).get("VmHWM", 0),
    }


def measure(name: str, spec: LinkSpec, total: int, tmp: Path) -> dict[str, Any]:
    with neutral_folder() as cwd:
        server = Child(
            f"window server ({name})",
            python(str(SCRIPT), "server", "--options", name),
            tmp / f"window-{name}.log",
            cwd=cwd,
        )
        try:
            address = server.wait_for_line(LISTENING, 120)
            result = asyncio.run(_measure(address, spec, total))
            result["server_peak_rss_bytes"] = json.loads(server.wait_for_line("peak ", 60))
        finally:
            server.stop()
    result["server_options"] = OPTIONS[name]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_window.py", description=__doc__.split("\n\n")[0])
    p.add_argument("role", nargs="?", choices=["server"])
    p.add_argument(
        "--options", nargs="+", choices=sorted(OPTIONS), default=["today", "window-32m", "bdp"]
    )
    p.add_argument("--rtt-ms", type=float, default=200.0)
    p.add_argument("--rate-mbit", type=float, default=1000.0)
    p.add_argument("--megabytes", type=float, default=200.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.role == "server":
        asyncio.run(_serve(OPTIONS[args.options[0]]))
        return 0
    import tempfile

    spec = LinkSpec.symmetric(args.rtt_ms / 1000, args.rate_mbit * 1e6)
    total = int(args.megabytes * 1e6)
    report: dict[str, Any] = {
        "link": {"rtt_ms": args.rtt_ms, "rate_mbit": args.rate_mbit},
        "bytes_each_way": total,
        "load_average_before": os.getloadavg(),
        "results": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-window-") as tmp:
        for name in args.options:
            report["results"][name] = measure(name, spec, total, Path(tmp))
            r = report["results"][name]
            print(
                f"[window] {name}: up {r['upload_MBps']} MB/s, down {r['download_MBps']} MB/s "
                f"(link {r['link_capacity_MBps']} MB/s)",
                file=sys.stderr,
                flush=True,
            )
    report["load_average_after"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
