"""Protocol-overhead benchmark: fedcore rounds against a bare grpc.aio echo on loopback.

N echo workers, which train nothing and send the received model straight back, run
federations of a ``vector`` model of d float32 parameters. For every (N, d) the benchmark
reports seconds per round (median of the timed rounds after one warm-up round), bytes moved per
round and the coordinator's peak RSS; and, in the same run, the time the same bytes take through
a bare ``grpc.aio`` stream-stream method with the same topology (one server process, N client
processes, every message echoed back): the physical floor of a round.

Targets (issue 14): a round within 1.3x of the floor at d=1e7, N=8; coordinator peak RSS
above its pre-round baseline within 3x the model's size there (global model, running sum, one
staged update). ``--past-2gib`` runs N=2, d=6e8 (2.4 GB float32, past protobuf's 2 GiB
message limit) end to end instead, with every process's peak memory: it is slow and needs
about 16 GB of free memory.

Roles (one script, several processes)::

    bench_overhead.py [--workers 4 8] [--sizes 1e5 1e6 1e7 1e8] [--rounds 5] [--out F] [--quick]
                      [--old-code GIT_REF]
    bench_overhead.py echo-worker --server HOST:PORT --name NAME
    bench_overhead.py floor-server --clients N --payload-bytes B [--chunk-bytes C] [--rounds R]
    bench_overhead.py floor-client --server HOST:PORT

The final JSON goes to stdout (and to ``--out``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (
    LIBRARY,
    REPO,
    BenchError,
    Child,
    code_env,
    neutral_folder,
    old_code,
    proc_status,
    python,
    report_imports,
    wait_all,
)

# fedcore is imported only where needed: importing it loads torch, which the floor's processes
# (pure gRPC) must not pay for, nor carry in their memory.

SCRIPT = Path(__file__).resolve()
FLOOR_METHOD = "/fedcore.bench.Floor/Echo"
LISTENING = "listening on "
RESULT = "result "
# Bytes per second below which a run is considered hung (bounds every wait on a transfer).
_SLOWEST_RATE = 20e6
# Generous: on a shared 2-core machine under load, importing torch alone can take minutes.
_START_TIMEOUT = 600.0
_QUICK_WORKERS = [2]
_QUICK_SIZES = [100_000, 1_000_000]
_PAST_2GIB = ([2], [600_000_000])
_ROUND_LIMIT = 1.3
_RSS_LIMIT = 3.0
# Room in a gRPC message besides a chunk, as fedcore.protocol.MESSAGE_OVERHEAD_BYTES.
_ENVELOPE_BYTES = 1024 * 1024

log = logging.getLogger("bench_overhead")


# ---------------------------------------------------------------------------- echo worker


def _echo_trainer(step: float) -> Any:
    """The echo trainer (imported lazily: importing the worker package loads torch)."""
    from fedcore.worker import EchoTrainer

    return EchoTrainer(step) if step else EchoTrainer()


def echo_worker_main(server: str, name: str, step: float = 0.0, certs: Path | None = None) -> int:
    """Run one echo worker until the coordinator ends the federation (with ``certs``: signed
    secure aggregation, the key and roster fed-certs wrote there)."""
    from fedcore.secagg.identity import SiloIdentity
    from fedcore.worker import Worker

    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {name} %(message)s")
    report_imports()  # checked by the harness: this worker runs the tree it was meant to
    _worker_heap()
    identity = (
        SiloIdentity.load(name, certs / "workers" / f"{name}.signing.pem", certs / "roster.json")
        if certs is not None
        else None
    )
    worker = Worker(server, name, _echo_trainer(step), give_up_after=60.0, identity=identity)
    asyncio.run(worker.run())
    # Read by measure_fedcore: this worker's peak memory.
    print(f"{RESULT}{json.dumps({'peak_rss_bytes': proc_status(os.getpid()).get('VmHWM', 0)})}")
    return 0


def _worker_heap() -> None:
    """What ``fed-worker`` does at start (old code without it: nothing)."""
    try:
        from fedcore.heap import threshold_for  # noqa: F401  (absent from the old code)
    except ImportError:
        return
    from fedcore.heap import return_freed_memory
    from fedcore.protocol import DEFAULT_CHUNK_BYTES, max_message_bytes

    return_freed_memory(max_message_bytes(DEFAULT_CHUNK_BYTES))


# ---------------------------------------------------------------------------- floor


def _grpc_options(chunk_bytes: int) -> list[tuple[str, int]]:
    limit = chunk_bytes + _ENVELOPE_BYTES
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
    ]


def _message_sizes(payload_bytes: int, chunk_bytes: int) -> list[int]:
    """``payload_bytes`` cut into messages of ``chunk_bytes`` (the last one shorter)."""
    full, rest = divmod(payload_bytes, chunk_bytes)
    return [chunk_bytes] * full + ([rest] if rest else [])


async def _floor_server(
    clients: int, payload_bytes: int, chunk_bytes: int, rounds: int, timeout: float
) -> dict[str, Any]:
    """Serve the echo method, run ``rounds`` rounds over ``clients`` streams, time each."""
    loop = asyncio.get_running_loop()
    joined: asyncio.Queue[grpc.aio.ServicerContext[bytes, bytes]] = asyncio.Queue()
    finished: asyncio.Future[None] = loop.create_future()

    async def echo(request_iterator: Any, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        hello = await context.read()
        if hello is grpc.aio.EOF:  # type: ignore[attr-defined]
            return
        await joined.put(context)
        await asyncio.shield(finished)  # the stream lives until the benchmark is over

    handler = grpc.stream_stream_rpc_method_handler(echo)  # no serializers: raw bytes
    service, method = FLOOR_METHOD.strip("/").split("/")
    server = grpc.aio.server(options=_grpc_options(chunk_bytes))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service, {method: handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"{LISTENING}127.0.0.1:{port}", flush=True)
    sizes = _message_sizes(payload_bytes, chunk_bytes)
    payloads = {size: bytes(size) for size in set(sizes)}
    messages = [payloads[size] for size in sizes]

    async def one_stream(context: grpc.aio.ServicerContext[bytes, bytes]) -> int:
        async def send() -> None:
            for message in messages:
                await context.write(message)

        async def receive() -> int:
            got = 0
            for _ in messages:
                message = await context.read()
                if message is grpc.aio.EOF:  # type: ignore[attr-defined]
                    raise BenchError("a floor client closed its stream mid-round")
                got += len(message)
            return got

        _, got = await asyncio.gather(send(), receive())
        return got

    try:
        contexts = [await asyncio.wait_for(joined.get(), timeout) for _ in range(clients)]
        seconds: list[float] = []
        for _ in range(rounds):
            started = time.perf_counter()
            got = await asyncio.wait_for(
                asyncio.gather(*(one_stream(c) for c in contexts)), timeout
            )
            seconds.append(time.perf_counter() - started)
            if sum(got) != clients * payload_bytes:
                raise BenchError(
                    f"a floor round got {sum(got)} bytes back, expected {clients * payload_bytes}"
                )
        return {
            "round_seconds": seconds,
            "messages_per_stream": len(messages),
            "server_peak_rss_bytes": proc_status(os.getpid()).get("VmHWM", 0),
        }
    finally:
        if not finished.done():
            finished.set_result(None)
        await server.stop(1.0)


def floor_server_main(
    clients: int, payload_bytes: int, chunk_bytes: int, rounds: int, timeout: float
) -> int:
    """Run the floor server; print its timings as a ``result {json}`` line."""
    result = asyncio.run(_floor_server(clients, payload_bytes, chunk_bytes, rounds, timeout))
    print(RESULT + json.dumps(result), flush=True)
    return 0


async def _floor_client(server: str, chunk_bytes: int, timeout: float, batch: int) -> None:
    """Echo the messages the floor server sends, on the same stream, until it ends it: each one
    as it arrives, or (``batch`` > 1) each ``batch`` of them once all arrived."""
    async with grpc.aio.insecure_channel(server, options=_grpc_options(chunk_bytes)) as channel:
        call: Any = channel.stream_stream(FLOOR_METHOD, None, None)(None)
        await call.write(b"hello")
        held: list[bytes] = []
        while True:
            message = await asyncio.wait_for(call.read(), timeout)
            if message is grpc.aio.EOF:  # type: ignore[attr-defined]
                return
            held.append(message)
            if len(held) >= batch:
                for m in held:
                    await call.write(m)
                held = []


def floor_client_main(server: str, chunk_bytes: int, timeout: float, batch: int = 1) -> int:
    """Run one floor client; print its peak memory as a ``result {json}`` line."""
    asyncio.run(_floor_client(server, chunk_bytes, timeout, batch))
    print(f"{RESULT}{json.dumps({'peak_rss_bytes': proc_status(os.getpid()).get('VmHWM', 0)})}")
    return 0


# ---------------------------------------------------------------------------- processes


def _transfer_timeout(workers: int, payload_bytes: int, rounds: int) -> float:
    """A generous bound on a run moving this much: 2 directions, every worker, every round."""
    return _START_TIMEOUT + rounds * 2 * workers * payload_bytes / _SLOWEST_RATE


# ---------------------------------------------------------------------------- measurements


# Routes a federation's workers: given the coordinator's address and the number of workers,
# the address each worker dials (bench_wan.py puts a link of its own in front of every one).
Route = Callable[[str, int], list[str]]


def _direct(address: str, workers: int) -> list[str]:
    return [address] * workers


def measure_fedcore(
    workers: int,
    params: int,
    rounds: int,
    tmp: Path,
    server_args: Sequence[str] = (),
    code: Path | None = None,
    *,
    route: Route = _direct,
    worker_args: Sequence[str] = (),
    label: str | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """One federation of ``1 + rounds`` rounds; metrics of the timed rounds. ``code``: a
    checkout whose fedcore the processes run instead of this one (see
    :func:`benchlib.old_code`); every process is checked to have imported that tree."""
    env = code_env(code)
    tree = REPO if code is None else code
    label = label or ("old" if code is not None else "new")
    model_bytes = 4 * params
    tag = f"{label}-{workers}-{params}"
    metrics_path = tmp / f"metrics-{tag}.jsonl"
    timeout = timeout or _transfer_timeout(workers, model_bytes, rounds + 1)
    children: list[Child] = []
    started = time.perf_counter()
    with neutral_folder() as cwd:
        try:
            server = Child(
                "fed-server",
                python(
                    str(LIBRARY),
                    "run-module",
                    "fedcore.server",
                    "--listen",
                    "127.0.0.1:0",
                    "--model",
                    "vector",
                    "--model-params",
                    json.dumps({"size": params}),
                    "--min-workers",
                    str(workers),
                    "--rounds",
                    str(rounds + 1),
                    "--fed-eval-every",
                    "0",
                    "--metrics-out",
                    str(metrics_path),
                    "--round-timeout",
                    "600",
                    "--join-timeout",
                    str(_START_TIMEOUT),
                    "--quiet",
                    *server_args,
                ),
                tmp / f"server-{tag}.log",
                cwd=cwd,
                env=env,
            )
            children.append(server)
            imported = {"fed-server": server.check_imports(tree, _START_TIMEOUT)}
            address = server.wait_for_line(LISTENING, _START_TIMEOUT)
            baseline = proc_status(server.pid)
            for i, dial in enumerate(route(address, workers)):
                children.append(
                    Child(
                        f"echo worker {i}",
                        python(
                            str(SCRIPT),
                            "echo-worker",
                            "--server",
                            dial,
                            "--name",
                            f"echo-{i}",
                            *worker_args,
                        ),
                        tmp / f"echo-{tag}-{i}.log",
                        cwd=cwd,
                        env=env,
                    )
                )
            for child in children[1:]:
                imported[child.name] = child.check_imports(tree, _START_TIMEOUT)
            polled = wait_all(server, children[1:], timeout)
            worker_peaks = [
                json.loads(child.wait_for_line(RESULT, 30))["peak_rss_bytes"]
                for child in children[1:]
            ]
        finally:
            for child in reversed(children):
                child.stop()
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if len(rows) != rounds + 1:
        raise BenchError(f"expected {rounds + 1} rounds in {metrics_path}, found {len(rows)}")
    timed = [r for r in rows if r["round"] > 1]
    peak = max(r["peak_rss_bytes"] for r in rows)
    base_rss = baseline.get("VmRSS", 0)
    return {
        "seconds_per_round": statistics.median(r["duration_s"] for r in timed),
        "round_seconds": [r["duration_s"] for r in rows],
        "bytes_moved_per_round": statistics.median(
            r["bytes_sent"] + r["bytes_received"] for r in timed
        ),
        "bytes_sent_per_round": statistics.median(r["bytes_sent"] for r in timed),
        "bytes_received_per_round": statistics.median(r["bytes_received"] for r in timed),
        "failures": sum(r["failures"] for r in rows),
        "attempts": [r["attempts"] for r in rows],
        "peak_rss_bytes": peak,
        "peak_rss_by_round": [r["peak_rss_bytes"] for r in rows],
        "worker_peak_rss_bytes": worker_peaks,
        "baseline_rss_bytes": base_rss,
        "baseline_hwm_bytes": baseline.get("VmHWM", 0),
        "peak_above_baseline_bytes": peak - base_rss,
        "polled_hwm_bytes": polled.get("VmHWM", 0),
        "polled_max_rss_bytes": polled.get("VmRSS", 0),
        "wall_seconds": round(wall, 2),
        "code": str(tree),
        "imported_fedcore": imported["fed-server"]["fedcore"],
    }


def measure_floor(
    workers: int,
    params: int,
    rounds: int,
    tmp: Path,
    chunk_bytes: int,
    *,
    barrier: bool = False,
    route: Route = _direct,
    timeout: float | None = None,
) -> dict[str, Any]:
    """The same bytes through a bare grpc.aio echo: one server, ``workers`` client processes.

    With ``barrier`` each client echoes the payload only once all of it arrived, as a worker
    must (it trains on the whole model); otherwise it echoes each message as it arrives.
    """
    payload = 4 * params
    timeout = timeout or _transfer_timeout(workers, payload, rounds + 1)
    children: list[Child] = []
    started = time.perf_counter()
    tag = f"{workers}-{params}{'-barrier' if barrier else ''}"
    with neutral_folder() as cwd:
        try:
            server = Child(
                "floor server",
                python(
                    str(SCRIPT),
                    "floor-server",
                    "--clients",
                    str(workers),
                    "--payload-bytes",
                    str(payload),
                    "--chunk-bytes",
                    str(chunk_bytes),
                    "--rounds",
                    str(rounds + 1),
                    "--timeout",
                    str(timeout),
                ),
                tmp / f"floor-server-{tag}.log",
                cwd=cwd,
            )
            children.append(server)
            address = server.wait_for_line(LISTENING, _START_TIMEOUT)
            for i, dial in enumerate(route(address, workers)):
                children.append(
                    Child(
                        f"floor client {i}",
                        python(
                            str(SCRIPT),
                            "floor-client",
                            "--server",
                            dial,
                            "--chunk-bytes",
                            str(chunk_bytes),
                            "--timeout",
                            str(timeout),
                            "--batch",
                            str(len(_message_sizes(payload, chunk_bytes)) if barrier else 1),
                        ),
                        tmp / f"floor-client-{tag}-{i}.log",
                        cwd=cwd,
                    )
                )
            result = json.loads(server.wait_for_line(RESULT, timeout))
            wait_all(server, children[1:], 60.0)
            client_peaks = [
                json.loads(child.wait_for_line(RESULT, 30))["peak_rss_bytes"]
                for child in children[1:]
            ]
        finally:
            for child in reversed(children):
                child.stop()
    seconds = result["round_seconds"]
    return {
        "seconds_per_round": round(statistics.median(seconds[1:]), 4),
        "round_seconds": [round(s, 4) for s in seconds],
        "bytes_moved_per_round": 2 * workers * payload,
        "messages_per_stream": result["messages_per_stream"],
        "chunk_bytes": chunk_bytes,
        "server_peak_rss_bytes": result["server_peak_rss_bytes"],
        "client_peak_rss_bytes": client_peaks,
        "wall_seconds": round(time.perf_counter() - started, 2),
    }


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def measure(
    workers: int,
    params: int,
    rounds: int,
    tmp: Path,
    chunk_bytes: int,
    server_args: Sequence[str] = (),
    old: Path | None = None,
) -> dict[str, Any]:
    """fedcore, the floor (messages of ``chunk_bytes``, as fedcore's) and, given ``old``, the
    old code for one (N, d)."""
    model_bytes = 4 * params
    fed = measure_fedcore(workers, params, rounds, tmp, server_args)
    _progress(
        f"N={workers} d={params:.0e}: fedcore {fed['seconds_per_round']:.3f} s/round, "
        f"peak RSS {fed['peak_rss_bytes'] / 1e6:.0f} MB ({fed['wall_seconds']:.0f} s)"
    )
    before = None if old is None else measure_fedcore(workers, params, rounds, tmp, (), old)
    if before is not None:
        _progress(
            f"N={workers} d={params:.0e}: old code {before['seconds_per_round']:.3f} s/round, "
            f"peak RSS {before['peak_rss_bytes'] / 1e6:.0f} MB ({before['wall_seconds']:.0f} s)"
        )
    floor = measure_floor(workers, params, rounds, tmp, chunk_bytes)
    _progress(
        f"N={workers} d={params:.0e}: floor   {floor['seconds_per_round']:.3f} s/round "
        f"({floor['wall_seconds']:.0f} s)"
    )
    barrier = measure_floor(workers, params, rounds, tmp, chunk_bytes, barrier=True)
    _progress(
        f"N={workers} d={params:.0e}: floor with a barrier {barrier['seconds_per_round']:.3f} "
        f"s/round ({barrier['wall_seconds']:.0f} s)"
    )
    return {
        "workers": workers,
        "params": params,
        "model_bytes": model_bytes,
        "fedcore": fed,
        "floor": floor,
        # A worker echoes the model only once all of it arrived (it trains on the whole of
        # it): the floor of a round with that barrier.
        "floor_with_barrier": barrier,
        "ratio_round_to_floor": _ratio(fed["seconds_per_round"], floor["seconds_per_round"]),
        "ratio_round_to_floor_with_barrier": _ratio(
            fed["seconds_per_round"], barrier["seconds_per_round"]
        ),
        "rss_ratio_to_model": _ratio(fed["peak_rss_bytes"], model_bytes),
        "rss_above_baseline_ratio_to_model": _ratio(fed["peak_above_baseline_bytes"], model_bytes),
        **(
            {}
            if before is None
            else {
                "old_code": before,
                "old_code_ratio_round_to_floor": _ratio(
                    before["seconds_per_round"], floor["seconds_per_round"]
                ),
                "old_code_rss_above_baseline_ratio_to_model": _ratio(
                    before["peak_above_baseline_bytes"], model_bytes
                ),
                "speedup_over_old_code": _ratio(
                    before["seconds_per_round"], fed["seconds_per_round"]
                ),
            }
        ),
    }


def evaluate_targets(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The issue's two targets at N=8, d=1e7 (``met`` is None when that point was not run).

    The RSS target is judged on the whole process (literal reading) and, because the Python,
    torch and gRPC runtime alone weigh several times a 40 MB model, also on the growth above
    the coordinator's RSS before workers joined; the largest N=8 model is reported as well.
    """
    at = {(e["workers"], e["params"]): e for e in entries}
    point = at.get((8, 10_000_000))
    largest = max(
        (e for e in entries if e["workers"] == 8), key=lambda e: e["params"], default=None
    )
    round_target: dict[str, Any] = {
        "workers": 8,
        "params": 10_000_000,
        "limit": _ROUND_LIMIT,
        "met": None,
    }
    rss_target: dict[str, Any] = {
        "workers": 8,
        "params": 10_000_000,
        "limit_above_baseline": _RSS_LIMIT,
        "met": None,
    }
    if point is not None:
        ratio = point["ratio_round_to_floor"]
        round_target.update(
            met=ratio is not None and ratio <= _ROUND_LIMIT,
            ratio=ratio,
            ratio_to_floor_with_barrier=point["ratio_round_to_floor_with_barrier"],
            fedcore_seconds_per_round=point["fedcore"]["seconds_per_round"],
            floor_seconds_per_round=point["floor"]["seconds_per_round"],
        )
        rss_target.update(_rss_verdict(point))
    if largest is not None:
        rss_target["at_largest_model"] = {"params": largest["params"], **_rss_verdict(largest)}
    return {
        "round_within_1_3x_floor": round_target,
        "coordinator_rss_above_baseline_within_3x_model": rss_target,
    }


def _rss_verdict(entry: dict[str, Any]) -> dict[str, Any]:
    fed = entry["fedcore"]
    return {
        "met": entry["rss_above_baseline_ratio_to_model"] <= _RSS_LIMIT,
        "ratio": entry["rss_ratio_to_model"],
        "above_baseline_ratio": entry["rss_above_baseline_ratio_to_model"],
        "peak_rss_bytes": fed["peak_rss_bytes"],
        "baseline_rss_bytes": fed["baseline_rss_bytes"],
        "model_bytes": entry["model_bytes"],
    }


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run_benchmark(
    workers: Sequence[int],
    sizes: Sequence[int],
    rounds: int,
    server_args: Sequence[str] = (),
    old_ref: str | None = None,
) -> dict[str, Any]:
    """Every (N, d) in turn; the full report."""
    from fedcore.protocol import DEFAULT_CHUNK_BYTES

    started = time.perf_counter()
    entries: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-overhead-")))
        old = None if old_ref is None else stack.enter_context(old_code(old_ref))
        for n in workers:
            for d in sizes:
                entries.append(measure(n, d, rounds, tmp, DEFAULT_CHUNK_BYTES, server_args, old))
    return {
        "results": entries,
        "targets": evaluate_targets(entries),
        "meta": {
            "timed_rounds": rounds,
            "warmup_rounds": 1,
            "statistic": "median",
            "chunk_bytes": DEFAULT_CHUNK_BYTES,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "grpc": grpc.__version__,
            "total_seconds": round(time.perf_counter() - started, 1),
            "server_args": list(server_args),
            "old_code": old_ref,
        },
    }


# ---------------------------------------------------------------------------- command line


def _count(text: str) -> int:
    """A positive integer, also written as a float such as ``1e7``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value.is_integer() or value < 1 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_overhead.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--workers", type=_count, nargs="+", default=[4, 8], help="values of N")
    p.add_argument(
        "--sizes",
        type=_count,
        nargs="+",
        default=[100_000, 1_000_000, 10_000_000, 100_000_000],
        help="model sizes d in float32 parameters",
    )
    p.add_argument("--rounds", type=_count, default=5, help="timed rounds after one warm-up")
    p.add_argument("--out", type=Path, help="also write the JSON report here")
    p.add_argument("--quick", action="store_true", help="smoke test: N in {2}, d in {1e5, 1e6}")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="pass ARG to fed-server (repeat; e.g. --server-arg=--upload-slots --server-arg=8)",
    )
    p.add_argument(
        "--old-code",
        metavar="GIT_REF",
        help="also run the federations with this commit's fedcore (e.g. main), same machine, "
        "same run",
    )
    p.add_argument(
        "--past-2gib",
        action="store_true",
        help="N=2, d=6e8 (2.4 GB float32) end to end; slow, needs about 16 GB free memory",
    )
    roles = p.add_subparsers(dest="role", metavar="ROLE", help="internal roles (processes)")
    echo = roles.add_parser("echo-worker", help="one fedcore worker that echoes the model")
    echo.add_argument("--server", required=True)
    echo.add_argument("--name", required=True)
    echo.add_argument(
        "--step", type=float, default=0.0, help="add this to every weight (a changing model)"
    )
    echo.add_argument(
        "--certs", type=Path, help="signed secure aggregation: the fed-certs directory"
    )
    fs = roles.add_parser("floor-server", help="the bare grpc.aio server of the floor")
    fs.add_argument("--clients", type=_count, required=True)
    fs.add_argument("--payload-bytes", type=_count, required=True)
    fs.add_argument("--chunk-bytes", type=_count, required=True)
    fs.add_argument("--rounds", type=_count, default=6)
    fs.add_argument("--timeout", type=float, default=600.0)
    fc = roles.add_parser("floor-client", help="one echo client of the floor")
    fc.add_argument("--server", required=True)
    fc.add_argument("--chunk-bytes", type=_count, required=True)
    fc.add_argument("--timeout", type=float, default=600.0)
    fc.add_argument("--batch", type=_count, default=1, help="echo messages in batches of this")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.role == "echo-worker":
        return echo_worker_main(args.server, args.name, args.step, args.certs)
    if args.role == "floor-server":
        return floor_server_main(
            args.clients, args.payload_bytes, args.chunk_bytes, args.rounds, args.timeout
        )
    if args.role == "floor-client":
        return floor_client_main(args.server, args.chunk_bytes, args.timeout, args.batch)
    workers, sizes = (_QUICK_WORKERS, _QUICK_SIZES) if args.quick else (args.workers, args.sizes)
    if args.past_2gib:
        workers, sizes = _PAST_2GIB
    try:
        report = run_benchmark(workers, sizes, args.rounds, args.server_arg, args.old_code)
    except BenchError as exc:
        print(f"bench_overhead: error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
