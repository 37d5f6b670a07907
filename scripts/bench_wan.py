"""WAN benchmark: fedcore rounds and a bare grpc.aio echo, every silo behind its own link.

Each silo (an echo worker, which trains nothing and sends the model back, or a bare grpc.aio
client) dials the coordinator through its own emulated link (scripts/wanlink.py: one-way delay
and a token-bucket rate per direction, bounded buffers, flow control end to end); the
coordinator's side is unlimited. For every point of the grid, in one run: fedcore with each
requested ``--variant`` of flags, the bare echo (each client echoes once the whole model
arrived, as a worker must) through the same links, the physical floor (the model down and up
at the slowest link's rate plus one round trip), the ratios, and every process's peak memory
(coordinator, workers, echo server and clients, the link process and its CPU time).

    bench_wan.py [--workers 4 8] [--sizes 2.5e6 1e7] [--rtt-ms 50] [--rate-mbit 100]
                 [--straggler-mbit 10] [--variant default slots deadline secagg fedbuff]
                 [--rounds 3] [--ceiling] [--old-code REF] [--code REF] [--quick] [--out F]
    bench_wan.py --grid issue28 --list          # the preset's points, numbered
    bench_wan.py --grid issue28 --pick 0-1 5    # run some of them (split a long grid)
    bench_wan.py table REPORT.json [...]        # a Markdown table of reports' points
    bench_wan.py links --upstream HOST:PORT --rtt-ms MS --rate-mbit R [R ...]

``--straggler-mbit R`` adds, for every point, the same federation with silo 0 on an R Mbit/s
link. ``--grid issue28`` is issue 28's grid in the order it asks for (N in {4, 8, 16}, d in
{2.5e6, 1e7}, RTT in {2, 50, 200} ms, 100 Mbit/s and 1 Gbit/s, then one 10 Mbit/s silo among
100 Mbit/s ones with deadlines and FedBuff). ``--ceiling`` also measures, once per (N, d), the
bare echo through the same proxies with no delay and no rate limit: the most this machine's
proxies (one asyncio process for all silos) and processes can carry, so a point whose transfer
takes less than that is CPU-bound, not link-bound (``bound`` in its entry). The final JSON goes to stdout (and ``--out``); progress goes to stderr. The machine's
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
# A ceiling below this share of the transfer floor leaves the link the bottleneck; above it
# the proxies' CPU shares the blame, and at 1 or more it alone sets the round.
_MIXED_SHARE = 0.5
_QUICK: dict[str, list[Any]] = {
    "workers": [2],
    "sizes": [1_000_000],
    "rtt_ms": [50.0],
    "rate_mbit": [100.0],
}
# Flags of each fedcore variant: (fed-server flags, echo-worker flags); "{n}" is N, "{quorum}"
# the silos on the fastest links and "{deadline}" the round deadline (see Point.deadline).
# "plain" and "secagg" change the model every round (a worker masks one update per model).
VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "slots": (("--upload-slots", "{n}"), ()),
    "deadline": (("--round-timeout", "{deadline}", "--min-results", "{quorum}"), ()),
    "plain": ((), ("--step", "1e-3")),
    "secagg": (("--secagg",), ("--step", "1e-3")),
    "fedbuff": (("--strategy", "fedbuff"), ()),
    # FedBuff stages each upload whole in an upload slot (its aggregator does not stream):
    # with one slot, a slow silo's upload holds back every other.
    "fedbuff-slots": (("--strategy", "fedbuff", "--upload-slots", "{n}"), ()),
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
        link's rate, plus one round trip: the task's last byte reaches a silo half a round trip
        after it left, and its result's last byte the coordinator half a round trip after it
        left. (Until issue 28's grid this counted two round trips; at 200 ms the bare echo
        ran 0.2 s under that.)"""
        slowest = min(self.rates_mbit) * _MBIT
        return 2 * model_bytes * 8 / slowest + self.rtt_ms / 1000

    def transfer_floor(self, model_bytes: int) -> float:
        """The floor's byte part: the model down and up at the slowest link's rate."""
        return self.physical_floor(model_bytes) - self.rtt_ms / 1000

    def describe(self) -> dict[str, Any]:
        # JSON has no infinity: an unlimited link's rate is written as null.
        rates = [None if math.isinf(r) else r for r in self.rates_mbit]
        distinct = sorted({r for r in self.rates_mbit if not math.isinf(r)})
        return {"rtt_ms": self.rtt_ms, "rates_mbit": rates, "distinct": distinct}

    def label(self) -> str:
        return f"rtt={self.rtt_ms:g}ms rates={sorted(set(self.rates_mbit))}"


@dataclass(frozen=True)
class Point:
    """One federation of the grid: N silos, d parameters, their links, and (None: the run's
    ``--variant``) the fedcore variants it runs."""

    workers: int
    params: int
    net: Net
    variants: tuple[str, ...] | None = None

    def name(self) -> str:
        return f"N={self.workers} d={self.params:.2g} {self.net.label()}"

    def quorum(self) -> int:
        """The silos on the fastest links: the results a round with a deadline waits for."""
        fastest = max(self.net.rates_mbit)
        return max(1, sum(1 for r in self.net.rates_mbit if r == fastest))

    def deadline(self, given: float | None) -> float:
        """``given``, else twice the floor of the fastest links (what a round would cost
        without the slower silos), at least 1 s: ample for the quorum, too short for a
        straggler."""
        if given is not None:
            return given
        fast = Net(self.net.rtt_ms, (max(self.net.rates_mbit),) * self.workers)
        return round(max(1.0, 2 * fast.physical_floor(4 * self.params)), 1)


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


def _flags(flags: Sequence[str], point: Point, deadline: float | None) -> list[str]:
    values = {
        "n": point.workers,
        "quorum": point.quorum(),
        "deadline": point.deadline(deadline),
    }
    return [f.format(**values) for f in flags]


def measure_ceiling(workers: int, params: int, rounds: int, tmp: Path) -> dict[str, Any]:
    """The bare echo through ``workers`` proxies with no delay and no rate limit: the most the
    one link process and the machine's cores carry for this (N, d)."""
    from fedcore.protocol import DEFAULT_CHUNK_BYTES

    net = Net(0.0, (math.inf,) * workers)
    with neutral_folder() as cwd:
        links = Links(net, tmp / f"links-{workers}-{params}-ceiling.log", cwd)
        try:
            echo = overhead.measure_floor(
                workers,
                params,
                rounds,
                tmp,
                DEFAULT_CHUNK_BYTES,
                barrier=True,
                route=links,
            )
        finally:
            link_stats = links.close()
    echo["links"] = link_stats
    seconds = echo["seconds_per_round"]
    # Each phase (down, then up: the clients echo only once all of it arrived) moves N models.
    echo["bytes_per_second_each_way"] = round(echo["bytes_moved_per_round"] / seconds)
    echo["load_average"] = os.getloadavg()
    _progress(
        f"N={workers} d={params:.2g}: ceiling (no delay, no rate) {seconds:.3f} s/round, "
        f"{echo['bytes_per_second_each_way'] / 1e6:.0f} MB/s each way"
    )
    return echo


def bound(point: Point, echo_seconds: float, ceiling: dict[str, Any] | None) -> dict[str, Any]:
    """Whether the links or this machine's CPU set the point's round: the ceiling's round
    against the bytes' share of the physical floor (the ``proxy_share``)."""
    transfer = point.net.transfer_floor(4 * point.params)
    verdict: dict[str, Any] = {"transfer_floor_seconds": round(transfer, 4)}
    if ceiling is None:
        return verdict
    share = ceiling["seconds_per_round"] / transfer
    verdict["ceiling_seconds_per_round"] = ceiling["seconds_per_round"]
    verdict["proxy_share"] = round(share, 3)
    verdict["verdict"] = "cpu" if share >= 1 else "mixed" if share >= _MIXED_SHARE else "link"
    verdict["echo_over_ceiling_plus_rtt"] = (
        _ratio(echo_seconds, ceiling["seconds_per_round"] + point.net.rtt_ms / 1000)
        if echo_seconds
        else None
    )
    return verdict


def _echo(point: Point, rounds: int, tmp: Path, cwd: Path, timeout: float) -> dict[str, Any]:
    """The bare grpc.aio echo through the point's links, and the link process's figures."""
    from fedcore.protocol import DEFAULT_CHUNK_BYTES

    links = Links(point.net, tmp / f"links-{point.workers}-{point.params}-echo.log", cwd)
    try:
        echo = overhead.measure_floor(
            point.workers,
            point.params,
            rounds,
            tmp,
            DEFAULT_CHUNK_BYTES,
            barrier=True,
            route=links,
            timeout=timeout,
        )
    finally:
        echo_links = links.close()
    echo["links"] = echo_links
    return echo


def measure_point(
    point: Point,
    variants: Sequence[str],
    rounds: int,
    tmp: Path,
    old: Path | None,
    code: Path | None = None,
    *,
    deadline: float | None = None,
    ceiling: dict[str, Any] | None = None,
    echo: bool = True,
) -> dict[str, Any]:
    """The bare echo (unless not ``echo``: many rounds of a straggler's echo take minutes) and
    every variant (and the old code's default) for one point; ``code``: the tree the variants
    run (None: this one); ``ceiling``: its (N, d)'s :func:`measure_ceiling`, to say whether
    the point is CPU-bound."""
    workers, params, net = point.workers, point.params, point.net
    model_bytes = 4 * params
    name = point.name()
    load_before = os.getloadavg()
    timeout = _timeout(net, workers, model_bytes, rounds)
    runs: dict[str, Any] = {}
    bare: dict[str, Any] | None = None
    with neutral_folder() as cwd:
        if echo:
            bare = _echo(point, rounds, tmp, cwd, timeout)
            _progress(f"{name}: bare echo {bare['seconds_per_round']:.3f} s/round")
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
                    _flags(server_flags, point, deadline),
                    tree,
                    route=links,
                    worker_args=worker_flags,
                    label=variant,
                    timeout=timeout,
                )
            finally:
                link_stats = links.close()
            fed["links"] = link_stats
            fed["server_flags"] = _flags(server_flags, point, deadline)
            runs[variant] = fed
            _progress(
                f"{name}: {variant} {fed['seconds_per_round']:.3f} s/round "
                f"({', '.join(f'{s:.2f}' for s in fed['round_seconds'])}), coordinator peak "
                f"{fed['peak_rss_bytes'] / 1e6:.0f} MB, {fed['failures']} failure(s)"
            )
    floor = net.physical_floor(model_bytes)
    echo_s = 0.0 if bare is None else bare["seconds_per_round"]
    return {
        "workers": workers,
        "params": params,
        "model_bytes": model_bytes,
        "net": net.describe(),
        "physical_floor_seconds": round(floor, 4),
        "bare_echo": bare,
        "bare_echo_ratio_to_physical_floor": _ratio(echo_s, floor),
        "bound": bound(point, echo_s, ceiling),
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


def _even(n: int, d: int, rtt: float, rate: float) -> Point:
    return Point(n, d, Net(rtt, (rate,) * n))


def issue28() -> list[Point]:
    """Issue 28's grid, in the order its brief ranks them: N=16 at 50 ms and 100 Mbit/s; 2 and
    200 ms at N=8; 1 Gbit/s at N=8; the rest; then one 10 Mbit/s silo among seven at
    100 Mbit/s with the default flags, a deadline and FedBuff."""
    sizes = (2_500_000, 10_000_000)
    first = [_even(16, d, 50.0, 100.0) for d in sizes]
    first += [_even(8, d, rtt, 100.0) for rtt in (2.0, 200.0) for d in sizes]
    first += [_even(8, d, 50.0, 1000.0) for d in sizes]
    rest = [
        _even(n, d, rtt, rate)
        for n in (4, 8, 16)
        for rate in (100.0, 1000.0)
        for rtt in (2.0, 50.0, 200.0)
        for d in sizes
    ]
    straggler = Point(
        8,
        2_500_000,
        Net(50.0, (10.0, *(100.0,) * 7)),
        ("default", "deadline", "fedbuff"),
    )
    return first + [p for p in rest if p not in first] + [straggler]


GRIDS = {"issue28": issue28}


def pick(spec: Sequence[str], count: int) -> list[int]:
    """Indices from ``["0-3", "7"]`` (ranges inclusive), in the order given."""
    chosen: list[int] = []
    for part in (p for item in spec for p in item.split(",") if p):
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if not 0 <= first <= last < count:
            raise BenchError(f"--pick {part!r}: the grid has points 0-{count - 1}")
        chosen += [i for i in range(first, last + 1) if i not in chosen]
    return chosen


def grid(args: argparse.Namespace) -> list[Point]:
    """Every point to run, in order."""
    if args.grid is not None:
        points = GRIDS[args.grid]()
        return [points[i] for i in pick(args.pick, len(points))] if args.pick else points
    q = _QUICK if args.quick else {}
    points = []
    for n in q.get("workers", args.workers):
        for d in q.get("sizes", args.sizes):
            for rtt in q.get("rtt_ms", args.rtt_ms):
                for rate in q.get("rate_mbit", args.rate_mbit):
                    points.append(_even(n, d, rtt, rate))
                    if args.straggler_mbit:
                        slow = (args.straggler_mbit, *(rate,) * (n - 1))
                        points.append(Point(n, d, Net(rtt, slow)))
    return points


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    entries: list[dict[str, Any]] = []
    ceilings: dict[tuple[int, int], dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-wan-")))
        old = None if args.old_code is None else stack.enter_context(old_code(args.old_code))
        code = None if args.code is None else stack.enter_context(old_code(args.code))
        for point in grid(args):
            key = (point.workers, point.params)
            try:
                if args.ceiling and key not in ceilings:
                    ceilings[key] = measure_ceiling(*key, args.rounds, tmp)
                entries.append(
                    measure_point(
                        point,
                        args.variant if args.variant_given else point.variants or args.variant,
                        args.rounds,
                        tmp,
                        old,
                        code,
                        deadline=args.round_deadline,
                        ceiling=ceilings.get(key),
                        echo=not args.skip_echo,
                    )
                )
            except BenchError as exc:  # one point failing keeps the others
                _progress(f"{point.name()}: failed: {exc}")
                entries.append(
                    {
                        "workers": point.workers,
                        "params": point.params,
                        "net": point.net.describe(),
                        "error": str(exc),
                    }
                )
            if args.out is not None:  # what is measured so far survives an interrupted run
                _write(args.out, _report(entries, ceilings, args, started))
    return _report(entries, ceilings, args, started)


def _write(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _report(
    entries: list[dict[str, Any]],
    ceilings: dict[tuple[int, int], dict[str, Any]],
    args: argparse.Namespace,
    started: float,
) -> dict[str, Any]:
    return {
        "results": entries,
        "ceilings": [{"workers": n, "params": d, **c} for (n, d), c in ceilings.items()],
        "meta": {
            "timed_rounds": args.rounds,
            "warmup_rounds": 1,
            "statistic": "median",
            "variants": VARIANTS,
            "grid": args.grid,
            "pick": args.pick,
            "round_deadline": args.round_deadline,
            "uptime": _uptime(),
            "old_code": args.old_code,
            "code": args.code or "working tree",
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "grpc": grpc.__version__,
            "total_seconds": round(time.perf_counter() - started, 1),
            "link": "scripts/wanlink.py: per silo, delay rtt/2 and the rate each way",
        },
    }


def _uptime() -> str:
    """What ``uptime`` prints: when, and the load average over 1, 5 and 15 minutes."""
    one, five, fifteen = os.getloadavg()
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"{when} load average: {one:.2f}, {five:.2f}, {fifteen:.2f}"


# ---------------------------------------------------------------------------- the table


def _mb(value: float) -> str:
    return f"{value / 1e6:.0f}"


def table_row(entry: dict[str, Any]) -> str:
    """One point as a Markdown row: its links, the floor, the ceiling's verdict, the echo, each
    variant (seconds, its ratio to the echo), the coordinator's peak and the load average."""
    net, model = entry["net"], entry["model_bytes"]
    rates = "+".join(
        f"{k}x{r:g}" if k > 1 else f"{r:g}"
        for r, k in sorted(
            {r: net["rates_mbit"].count(r) for r in net["rates_mbit"]}.items(), key=str
        )
    )
    bound_ = entry.get("bound", {})
    ceiling = (
        f"{bound_['ceiling_seconds_per_round']:.2f} s ({bound_['verdict']})"
        if "verdict" in bound_
        else "-"
    )
    # The floor from the links, so that reports written before its change read alike.
    floor = Net(net["rtt_ms"], tuple(net["rates_mbit"])).physical_floor(model)
    echo = entry["bare_echo"]
    echo_cell = (
        "-"
        if echo is None
        else f"{echo['seconds_per_round']:.2f} s ({_ratio(echo['seconds_per_round'], floor):.2f}x)"
    )
    runs = []
    for variant, run in entry["fedcore"].items():
        ratio = entry["ratios"][variant]
        runs.append(
            f"{variant} {run['seconds_per_round']:.2f} s"
            + ("" if ratio["to_bare_echo"] is None else f" ({ratio['to_bare_echo']:.2f}x)")
            + (f", {run['failures']} late" if run["failures"] else "")
        )
    peaks = "; ".join(
        f"{_mb(run['peak_rss_bytes'])} MB "
        f"(+{entry['ratios'][v]['coordinator_peak_above_baseline_models']:.1f} models)"
        for v, run in entry["fedcore"].items()
    )
    workers = [p for run in entry["fedcore"].values() for p in run["worker_peak_rss_bytes"]]
    links = [r["links"] for r in entry["fedcore"].values()]
    if echo is not None:
        links.append(echo["links"])
    load = entry["load_average"]
    loads = sorted([*load["before"][:1], *load["after"][:1]])
    return (
        f"| {entry['workers']} | {entry['params']:.2g} ({model / 1e6:.0f} MB) | "
        f"{net['rtt_ms']:g} ms | {rates} | {floor:.2f} s | {ceiling} | "
        f"{echo_cell} | "
        f"{'; '.join(runs)} | {peaks} | {_mb(max(workers))} MB | "
        f"{_mb(max(link['peak_rss_bytes'] for link in links))} MB, "
        f"{max(link['cpu_seconds'] for link in links):.0f} s | "
        f"{loads[0]:.1f}-{loads[-1]:.1f} |"
    )


TABLE_HEAD = (
    "| N | d | RTT | Mbit/s | floor | ceiling (bound) | bare echo (x floor) "
    "| fedcore (x echo) | coordinator peak | worker peak | link process, CPU | load |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _table_order(entry: dict[str, Any]) -> tuple[bool, int, float, float, int]:
    rates = entry["net"]["rates_mbit"]
    uneven = len(set(rates)) > 1
    return (uneven, entry["workers"], max(rates), entry["net"]["rtt_ms"], entry["params"])


def table_main(paths: Sequence[Path]) -> int:
    """Print every measured point of ``paths`` as one Markdown table, ordered by N, rate,
    round trip and d, uneven links last (failed points listed after it)."""
    print(TABLE_HEAD)
    failed, measured = [], []
    for path in paths:
        for entry in json.loads(path.read_text(encoding="utf-8"))["results"]:
            if "error" in entry:
                failed.append(f"{path.name}: {entry['error']}")
            else:
                measured.append(entry)
    for entry in sorted(measured, key=_table_order):
        print(table_row(entry))
    for line in failed:
        print(f"\nfailed: {line}")
    return 0


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
        "--rate-mbit",
        type=_positive,
        nargs="+",
        default=[100.0],
        help="link rates, each way",
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
    p.add_argument(
        "--round-deadline",
        type=_positive,
        metavar="S",
        help="the deadline variant's --round-timeout (default: twice the fastest links' floor)",
    )
    p.add_argument("--grid", choices=sorted(GRIDS), help="a preset grid instead of the axes")
    p.add_argument(
        "--pick",
        nargs="+",
        default=[],
        metavar="I[-J]",
        help="run only these points of --grid (see --list), in this order",
    )
    p.add_argument("--list", action="store_true", help="print the points to run and exit")
    p.add_argument(
        "--skip-echo",
        action="store_true",
        help="run no bare echo (a long run of a straggler's variants; no ratios to the echo)",
    )
    p.add_argument(
        "--ceiling",
        action="store_true",
        help="also measure the echo through unlimited proxies once per (N, d)",
    )
    p.add_argument("--rounds", type=_count, default=3, help="timed rounds after one warm-up")
    p.add_argument("--old-code", metavar="GIT_REF", help="also run this commit's default flags")
    p.add_argument(
        "--code",
        metavar="GIT_REF",
        help="run the variants with this commit's fedcore (e.g. main)",
    )
    p.add_argument("--quick", action="store_true", help="N=2, d=1e6, 50 ms, 100 Mbit/s")
    p.add_argument("--out", type=Path, help="also write the JSON report here")
    roles = p.add_subparsers(dest="role", metavar="ROLE", help="internal roles (processes)")
    links = roles.add_parser("links", help="the emulated links in front of the coordinator")
    links.add_argument("--upstream", required=True)
    links.add_argument("--rtt-ms", type=float, required=True)
    links.add_argument("--rate-mbit", type=_positive, nargs="+", required=True)
    tab = roles.add_parser("table", help="a Markdown table of reports written by --out")
    tab.add_argument("reports", type=Path, nargs="+")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A preset point's own variants give way to a --variant named on the command line.
    args.variant_given = "--variant" in (sys.argv[1:] if argv is None else argv)
    if args.role == "links":
        return links_main(args.upstream, args.rtt_ms, args.rate_mbit)
    if args.role == "table":
        return table_main(args.reports)
    try:
        if args.list:
            points = grid(args)
            every = len(GRIDS[args.grid]()) if args.grid else len(points)
            indices = pick(args.pick, every) if args.pick and args.grid else range(every)
            for i, point in zip(indices, points, strict=True):
                variants = args.variant if args.variant_given else point.variants or args.variant
                print(f"{i:3d}  {point.name()}  variants={list(variants)}")
            return 0
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
