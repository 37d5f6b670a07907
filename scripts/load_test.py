"""Load test: many light *echo* workers (several per process) against a real ``fed-server``.

    python scripts/load_test.py --workers 200 --procs 8 --rounds 3 --params 100000

An echo worker returns the weights it received (no training), so the run measures the
coordinator and the protocol: how long 200 workers take to connect, how long a round of
200 model downloads and uploads takes, and the coordinator's peak memory. Prints one JSON
report (and writes it with ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

BIN = Path(sys.executable).parent


def _workers_main(args: argparse.Namespace) -> int:
    """Run ``--count`` echo workers in this process until the federation is over."""
    from fedcore.worker import EchoTrainer, Worker
    from fedcore.worker.runtime import _CHANNEL_OPTIONS

    def channel(target: str) -> grpc.aio.Channel:
        # One TCP connection per worker, as separate machines would have.
        options = [*_CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        return grpc.aio.insecure_channel(target, options=options)

    async def main() -> None:
        workers = [
            Worker(
                args.server,
                f"{args.prefix}{i}",
                EchoTrainer(),
                backoff_initial=0.2,
                backoff_max=2.0,
                give_up_after=300,
                channel_factory=channel,
            )
            for i in range(args.count)
        ]
        await asyncio.gather(*(w.run() for w in workers))

    asyncio.run(main())
    return 0


def _pump(proc: subprocess.Popen[str], lines: list[tuple[float, str]]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.monotonic(), line.rstrip("\n")))


def _wait_for(lines: list[tuple[float, str]], pattern: str, timeout: float) -> float:
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        for stamp, line in lines[seen:]:
            if regex.search(line):
                return stamp
        seen = len(lines)
        time.sleep(0.05)
    raise TimeoutError(f"no line matching {pattern!r} within {timeout} s")


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "metrics.jsonl"
        server_args = [
            str(BIN / "fed-server"),
            "--listen", "127.0.0.1:0",
            "--model", "vector", "--model-params", json.dumps({"size": args.params}),
            "--min-workers", str(args.workers), "--max-workers", str(args.workers),
            "--rounds", str(args.rounds), "--fed-eval-every", "0",
            "--round-timeout", "600", "--heartbeat-interval", "5",
            "--metrics-out", str(metrics),
        ]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        server = subprocess.Popen(
            server_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        lines: list[tuple[float, str]] = []
        threading.Thread(target=_pump, args=(server, lines), daemon=True).start()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            _wait_for(lines, r"listening on", 120)
            port = re.search(r"listening on [\d.]+:(\d+)", "\n".join(s for _, s in lines))
            assert port is not None
            per_proc = [
                args.workers // args.procs + (i < args.workers % args.procs)
                for i in range(args.procs)
            ]
            started = time.monotonic()
            for i, count in enumerate(per_proc):
                cmd = [
                    sys.executable, __file__, "--role", "workers",
                    "--server", f"127.0.0.1:{port[1]}", "--count", str(count), "--prefix", f"p{i}-",
                ]  # fmt: skip
                procs.append(
                    subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )
            all_joined = _wait_for(lines, rf"round 1: {args.workers} worker\(s\) training", 600)
            first_joined = _wait_for(lines, r"joined from", 1)
            code = server.wait(600)
            ended = time.monotonic()
            worker_codes = [p.wait(60) for p in procs]
        finally:
            everyone: list[subprocess.Popen[Any]] = [server, *procs]
            for p in everyone:
                if p.poll() is None:
                    p.kill()
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {
        "workers": args.workers,
        "processes": args.procs,
        "parameters": args.params,
        "rounds": len(rows),
        "server_exit": code,
        "worker_exits_nonzero": sum(1 for c in worker_codes if c != 0),
        "connect_all_s": round(all_joined - started, 2),
        "first_to_last_join_s": round(all_joined - first_joined, 2),
        "round_s": [r["duration_s"] for r in rows],
        "workers_per_round": [r["workers"] for r in rows],
        "failures_per_round": [r["failures"] for r in rows],
        "bytes_sent_per_round": [r["bytes_sent"] for r in rows],
        "coordinator_peak_rss_mb": round(max(r["peak_rss_bytes"] for r in rows) / 2**20, 1),
        "total_s": round(ended - started, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workers", type=int, default=200)
    p.add_argument("--procs", type=int, default=8, help="worker processes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--params", type=int, default=100_000, help="model parameters (float32)")
    p.add_argument("--out", type=Path, help="also write the JSON report here")
    p.add_argument(
        "--role", choices=["driver", "workers"], default="driver", help=argparse.SUPPRESS
    )
    p.add_argument("--server", help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    p.add_argument("--prefix", default="w", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "workers":
        return _workers_main(args)
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    ok = report["server_exit"] == 0 and report["rounds"] == args.rounds
    return 0 if ok and not report["worker_exits_nonzero"] else 1


if __name__ == "__main__":
    sys.exit(main())
