"""WAN benchmark: fedcore rounds and a bare grpc.aio echo, every silo behind its own link.

Each silo (an echo worker, which trains nothing and sends the model back, or a bare grpc.aio
client) dials the coordinator through its own emulated link (scripts/wanlink.py: one-way delay
and a token-bucket rate per direction, bounded buffers, flow control end to end); the
coordinator's side is unlimited. For every point of the grid, in one run: fedcore with each
requested ``--variant`` of flags, the bare echo (each client echoes once the whole model
arrived, as a worker must) through the same links, the physical floor (the model down and up
at the slowest link's rate plus two round trips), the ratios, and every process's peak memory
(coordinator, workers, echo server and clients, the link process and its CPU time).

    bench_wan.py [--workers 4 8] [--sizes 2.5e6 1e7] [--rtt-ms 50] [--rate-mbit 100]
                 [--straggler-mbit 10] [--variant default slots secagg fedbuff]
                 [--rounds 3] [--old-code REF] [--code REF] [--quick] [--out F]
    bench_wan.py links --upstream HOST:PORT --rtt-ms MS --rate-mbit R [R ...]

``--straggler-mbit R`` adds, for every point, the same federation with silo 0 on an R Mbit/s
link. The final JSON goes to stdout (and ``--out``); progress goes to stderr. The machine's
load average is recorded with every point (``os.getloadavg``): on a shared machine compare the
ratios measured within one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_overhead as overhead
from benchlib import BenchError, Child, neutral_folder, old_code, proc_status, python
from wanlink import Link, LinkSpec

SCRIPT = Path(__file__).resolve()
LINKS_READY = "links "
_MBIT = 1e6
_QUICK = {"workers": [2], "sizes": [1_000_000], "rtt_ms": [50.0], "rate_mbit": [100.0]}
# Flags of each fedcore variant: (fed-server flags, echo-worker flags); "{n}" is N.
# "plain" and "secagg" change the model every round (a worker masks one update per model).
VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "slots": (("--upload-slots", "{n}"), ()),
    "plain": ((), ("--step", "1e-3")),
    "secagg": (("--secagg",), ("--step", "1e-3")),
    "fedbuff": (("--strategy", "fedbuff"), ()),
}


# ---------------------------------------------------------------------------- the links process


async def _serve_links(upstream: tuple[str, int], specs: Sequence[LinkSpec]) -> None:
    links = [Link(upstream, spec) for spec in specs]
    ports = [await link.start() for link in links]
    print(LINKS_READY + json.dumps(ports), flush=True)
    await asyncio.Event().wait()  # until the harness stops this process


def links_main(upstream: str, rtt_ms: float, rates_mbit: Sequence[float]) -> int:
    """Serve one link per rate, all in front of ``upstream``; print their ports."""
    host, _, port = upstream.rpartition(":")
    specs = [LinkSpec.symmetric(rtt_ms / 1000, rate * _MBIT) for rate in rates_mbit]
    asyncio.run(_serve_links((host, int(port)), specs))
    return 0


# ---------------------------------------------------------------------------- the network


@dataclass(frozen=True)
class Net:
    """Every silo's link: the round trip and each silo's rate (both directions)."""

    rtt_ms: float
    rates_mbit: tuple[float, ...]

    def physical_floor(self, model_bytes: int) -> float:
        """Seconds for a round that only moves bytes: the model down and up at the slowest
        link's rate, plus two round trips (the task out, the result back)."""
        slowest = min(self.rates_mbit) * _MBIT
        return 2 * model_bytes * 8 / slowest + 2 * self.rtt_ms / 1000

    def describe(self) -> dict[str, Any]:
        rates = sorted(set(self.rates_mbit))
        return {"rtt_ms": self.rtt_ms, "rates_mbit": list(self.rates_mbit), "distinct": rates}


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Links:
    """The link process of one federation: a route for bench_overhead's measurements (started
    once the coordinator listens), and its peak memory and CPU time once closed."""

    def __init__(self, net: Net, log_path: Path, cwd: Path) -> None:
        self.net = net
        self._log_path = log_path
        self._cwd = cwd
        self._child: Child | None = None

    def __call__(self, address: str, workers: int) -> list[str]:
        if workers != len(self.net.rates_mbit) or self._child is not None:
            raise BenchError(f"{workers} silos for {len(self.net.rates_mbit)} links")
        self._child = Child(
            "links",
            python(
                str(SCRIPT),
                "links",
                "--upstream",
                address,
                "--rtt-ms",
                str(self.net.rtt_ms),
                "--rate-mbit",
                *map(str, self.net.rates_mbit),
            ),
            self._log_path,
            cwd=self._cwd,
        )
        ports: list[int] = json.loads(self._child.wait_for_line(LINKS_READY, 60))
        return [f"127.0.0.1:{port}" for port in ports]

    def close(self) -> dict[str, Any]:
        if self._child is None:
            return {}
        if self._child.proc.poll() is not None:
            raise BenchError(f"the link process died: {self._child.describe()}")
        stats = {
            "peak_rss_bytes": proc_status(self._child.pid).get("VmHWM", 0),
            "cpu_seconds": round(_cpu_seconds(self._child.pid), 2),
        }
        self._child.stop()
        self._child = None
        return stats


# ---------------------------------------------------------------------------- measurements


def _timeout(net: Net, workers: int, model_bytes: int, rounds: int) -> float:
    """A generous bound: every transfer one after the other at the slowest rate, twice."""
    per_round = workers * net.physical_floor(model_bytes)
    return overhead._START_TIMEOUT + 2 * (rounds + 1) * per_round


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def _progress(message: str) -> None:
    print(f"[wan] {message}", file=sys.stderr, flush=True)


def measure_point(
    workers: int,
    params: int,
    net: Net,
    variants: Sequence[str],
    rounds: int,
    tmp: Path,
    old: Path | None,
    code: Path | None = None,
) -> dict[str, Any]:
    """The bare echo and every variant (and the old code's default) for one (N, d, network);
    ``code``: the tree the variants run (None: this one)."""
    from fedcore.protocol import DEFAULT_CHUNK_BYTES

    model_bytes = 4 * params
    name = f"N={workers} d={params:.2g} rtt={net.rtt_ms:g}ms rates={sorted(set(net.rates_mbit))}"
    load_before = os.getloadavg()
    timeout = _timeout(net, workers, model_bytes, rounds)
    runs: dict[str, Any] = {}
    with neutral_folder() as cwd:
        links = Links(net, tmp / f"links-{workers}-{params}-echo.log", cwd)
        try:
            echo = overhead.measure_floor(
                workers,
                params,
                rounds,
                tmp,
                DEFAULT_CHUNK_BYTES,
                barrier=True,
                route=links,
                timeout=timeout,
            )
        finally:
            link_stats = links.close()
        echo["links"] = link_stats
        _progress(f"{name}: bare echo {echo['seconds_per_round']:.3f} s/round")
        plan = [(v, code) for v in variants] + ([("old-default", old)] if old else [])
        for variant, tree in plan:
            server_flags, worker_flags = VARIANTS[variant.removeprefix("old-")]
            links = Links(net, tmp / f"links-{workers}-{params}-{variant}.log", cwd)
            try:
                fed = overhead.measure_fedcore(
                    workers,
                    params,
                    rounds,
                    tmp,
                    [f.format(n=workers) for f in server_flags],
                    tree,
                    route=links,
                    worker_args=worker_flags,
                    label=variant,
                    timeout=timeout,
                )
            finally:
                link_stats = links.close()
            fed["links"] = link_stats
            runs[variant] = fed
            _progress(
                f"{name}: {variant} {fed['seconds_per_round']:.3f} s/round, coordinator peak "
                f"{fed['peak_rss_bytes'] / 1e6:.0f} MB"
            )
    floor = net.physical_floor(model_bytes)
    echo_s = echo["seconds_per_round"]
    return {
        "workers": workers,
        "params": params,
        "model_bytes": model_bytes,
        "net": net.describe(),
        "physical_floor_seconds": round(floor, 4),
        "bare_echo": echo,
        "bare_echo_ratio_to_physical_floor": _ratio(echo_s, floor),
        "fedcore": runs,
        "ratios": {
            v: {
                "to_bare_echo": _ratio(r["seconds_per_round"], echo_s),
                "to_physical_floor": _ratio(r["seconds_per_round"], floor),
                "coordinator_peak_above_baseline_models": _ratio(
                    r["peak_above_baseline_bytes"], model_bytes
                ),
            }
            for v, r in runs.items()
        },
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }


def grid(args: argparse.Namespace) -> list[tuple[int, int, Net]]:
    """Every (N, d, network) to run, in order."""
    q = _QUICK if args.quick else {}
    points: list[tuple[int, int, Net]] = []
    for n in q.get("workers", args.workers):
        for d in q.get("sizes", args.sizes):
            for rtt in q.get("rtt_ms", args.rtt_ms):
                for rate in q.get("rate_mbit", args.rate_mbit):
                    points.append((n, d, Net(rtt, (rate,) * n)))
                    if args.straggler_mbit:
                        slow = (args.straggler_mbit, *(rate,) * (n - 1))
                        points.append((n, d, Net(rtt, slow)))
    return points


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    entries: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-wan-")))
        old = None if args.old_code is None else stack.enter_context(old_code(args.old_code))
        code = None if args.code is None else stack.enter_context(old_code(args.code))
        for n, d, net in grid(args):
            try:
                entries.append(measure_point(n, d, net, args.variant, args.rounds, tmp, old, code))
            except BenchError as exc:  # one point failing keeps the others
                _progress(f"N={n} d={d:.2g} {net.describe()}: failed: {exc}")
                entries.append(
                    {"workers": n, "params": d, "net": net.describe(), "error": str(exc)}
                )
            if args.out is not None:  # what is measured so far survives an interrupted run
                _write(args.out, _report(entries, args, started))
    return _report(entries, args, started)


def _write(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _report(
    entries: list[dict[str, Any]], args: argparse.Namespace, started: float
) -> dict[str, Any]:
    return {
        "results": entries,
        "meta": {
            "timed_rounds": args.rounds,
            "warmup_rounds": 1,
            "statistic": "median",
            "variants": {v: VARIANTS[v] for v in args.variant},
            "old_code": args.old_code,
            "code": args.code or "working tree",
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "grpc": grpc.__version__,
            "total_seconds": round(time.perf_counter() - started, 1),
            "link": "scripts/wanlink.py: per silo, delay rtt/2 and the rate each way",
        },
    }


# ---------------------------------------------------------------------------- command line


def _count(text: str) -> int:
    value = float(text)
    if not value.is_integer() or value < 1 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(value)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"not positive: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_wan.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--workers", type=_count, nargs="+", default=[4, 8], help="values of N")
    p.add_argument(
        "--sizes",
        type=_count,
        nargs="+",
        default=[2_500_000, 10_000_000],
        help="model sizes d in float32 parameters",
    )
    p.add_argument("--rtt-ms", type=float, nargs="+", default=[50.0], help="round-trip times")
    p.add_argument(
        "--rate-mbit", type=_positive, nargs="+", default=[100.0], help="link rates, each way"
    )
    p.add_argument(
        "--straggler-mbit",
        type=_positive,
        help="also run every point with silo 0 on a link of this rate",
    )
    p.add_argument(
        "--variant",
        nargs="+",
        choices=sorted(VARIANTS),
        default=["default"],
        help="fedcore flag sets to run (slots: --upload-slots N)",
    )
    p.add_argument("--rounds", type=_count, default=3, help="timed rounds after one warm-up")
    p.add_argument("--old-code", metavar="GIT_REF", help="also run this commit's default flags")
    p.add_argument(
        "--code", metavar="GIT_REF", help="run the variants with this commit's fedcore (e.g. main)"
    )
    p.add_argument("--quick", action="store_true", help="N=2, d=1e6, 50 ms, 100 Mbit/s")
    p.add_argument("--out", type=Path, help="also write the JSON report here")
    roles = p.add_subparsers(dest="role", metavar="ROLE", help="internal roles (processes)")
    links = roles.add_parser("links", help="the emulated links in front of the coordinator")
    links.add_argument("--upstream", required=True)
    links.add_argument("--rtt-ms", type=float, required=True)
    links.add_argument("--rate-mbit", type=_positive, nargs="+", required=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.role == "links":
        return links_main(args.upstream, args.rtt_ms, args.rate_mbit)
    try:
        report = run_benchmark(args)
    except BenchError as exc:
        print(f"bench_wan: error: {exc}", file=sys.stderr)
        return 1
    if args.out is not None:
        _write(args.out, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
