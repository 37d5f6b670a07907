"""Secure-aggregation benchmark: compute per phase, bytes per worker, and secure vs plain rounds.

Three measurements, one JSON report (stdout, and ``--out``):

* ``masking``: throughput of the mask generator (AES-256-CTR keystream added in place) and of
  a worker's whole masking step (quantize + masks), on one core.
* ``in_process``: for every n, d and dropout rate, the whole protocol in one process
  (:class:`fedcore.secagg.simulation.Simulation`): mean worker compute per phase, coordinator
  compute per phase, bytes each worker sends per phase; SecAgg+ (k = 2*ceil(log2 n)) next to
  the complete graph where k < n - 1; and the plain counterpart for the same n and d (the
  coordinator folding n float32 updates into the weighted mean, 4d bytes per worker).
  Dropouts happen after key sharing and before the masked input, the costliest case for the
  coordinator (it reconstructs the dropped workers' keys and strips their pairwise masks).
* ``signatures``: the signed mode's extra cost (docs/secure-aggregation.md): the same
  in-process round at n = 8, d = 1e6 unsigned and signed, alternated, and the Ed25519 work a
  worker does per signed round (2 signatures, (n - 1) + (t - 1) verifications) timed on its own.
  ``--signatures-only`` runs just this section.
* ``processes``: real ``fed-server`` and echo workers (``bench_overhead.py echo-worker``) on
  loopback, a ``vector`` model of d parameters: median seconds per round, plain and
  ``--secagg``, in the same run.

Targets (issues 4 and 14): at n=8, d=1e6 over real processes a secure round costs at most
1.3x a plain round; masking runs at 500 MB/s or more per core.

    bench_secagg.py [--quick] [--workers 4 8 ...] [--sizes 1e5 1e6 1e7] [--dropouts 0 0.1 0.3]
                    [--process-workers 8] [--process-sizes 1e6] [--rounds 3] [--out F]
                    [--processes-only] [--old-code REF [--code REF] [--pairs K]]

``--old-code REF`` runs every process measurement with that commit's fedcore too, old then new
in each of ``--pairs`` pairs (alternated, so both see the same load); each entry records the
load average and the coordinator's seconds per secure phase (from its JSON log).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_overhead as overhead
import benchlib

from fedcore.errors import SecAggAbortedError
from fedcore.secagg import prg
from fedcore.secagg.params import SecAggParams
from fedcore.secagg.simulation import Simulation
from fedcore.strategy import WeightedMeanAggregator

SCRIPT = Path(__file__).resolve()
_PHASES = re.compile(r"phases (.*)$")
_PHASE = re.compile(r"(\w+) ([0-9.]+) s")


class Preset(TypedDict):
    """What one run measures: worker counts, model sizes, dropout rates, rounds."""

    workers: list[int]
    sizes: list[int]
    dropouts: list[float]
    process_workers: list[int]
    process_sizes: list[int]
    rounds: int


_QUICK: Preset = {
    "workers": [4, 8, 16],
    "sizes": [100_000, 1_000_000],
    "dropouts": [0.0, 0.3],
    "process_workers": [8],
    "process_sizes": [1_000_000],
    "rounds": 3,
}
_FULL: Preset = {
    "workers": [4, 8, 16, 32, 64],
    "sizes": [100_000, 1_000_000, 10_000_000],
    "dropouts": [0.0, 0.1, 0.3],
    "process_workers": [4, 8],
    "process_sizes": [100_000, 1_000_000],
    "rounds": 3,
}


def _progress(message: str) -> None:
    print(f"[bench_secagg] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- masking


def measure_masking(words: int = 10_000_000) -> dict[str, Any]:
    """MB/s of one mask (keystream + add) and of a worker's full masking step, one core."""
    vector = np.zeros(words, np.uint32)
    seed = os.urandom(32)
    prg.apply_masks(vector, plus=[seed])  # warm-up
    reps = 5
    started = time.perf_counter()
    for _ in range(reps):
        prg.apply_masks(vector, plus=[seed])
    mask_s = (time.perf_counter() - started) / reps
    # A worker among 8: quantize, then its self mask and 7 pairwise masks.
    delta = np.random.default_rng(0).normal(0, 0.01, words).astype(np.float32)
    sim = Simulation(SecAggParams(), [delta] * 8, [1] * 8, keep_plain=False)
    sim.run()
    per_worker_quantize = sim.timings["worker_quantize"] / 8
    per_worker_mask = sim.timings["worker_mask"] / 8
    mb = words * 4 / 1e6
    return {
        "words": words,
        "word_bytes": 4,
        "one_mask_mb_per_s": round(mb / mask_s, 1),
        "n8_worker_masks_seconds": round(per_worker_mask, 4),
        "n8_worker_mask_mb_per_s": round(8 * mb / per_worker_mask, 1),
        "n8_worker_quantize_seconds": round(per_worker_quantize, 4),
        "target_mb_per_s": 500,
        "meets_target": mb / mask_s >= 500,
    }


# ---------------------------------------------------------------------------- signatures


def measure_signatures(n: int = 8, d: int = 1_000_000, repeats: int = 3) -> dict[str, Any]:
    """The signed mode's cost next to the whole secure round's compute (all phases, all
    workers and the coordinator, in one process).

    Timed in wall-clock seconds and in this process's CPU seconds (``time.process_time``):
    on a shared machine the wall clock also counts other processes' turns on the cores, the
    CPU clock only this round's work, so the CPU share is the figure that survives the load
    (the load average before and after is reported with it)."""
    from fedcore.secagg.simulation import make_identities

    load_before = os.getloadavg()
    delta = np.random.default_rng(n).normal(0, 0.01, d).astype(np.float32)
    totals: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for signed in (False, True):
            sim = Simulation(SecAggParams(), [delta] * n, [10] * n, keep_plain=False, signed=signed)
            started, started_cpu = time.perf_counter(), time.process_time()
            sim.run()
            totals[signed].append(time.perf_counter() - started)
            cpu[signed].append(time.process_time() - started_cpu)
    # The Ed25519 work itself, which the round's noise can hide: per worker per round it
    # signs its keys and the request (its own relayed signature is compared with the one it
    # kept), verifies n - 1 peers' keys and t - 1 peers' signatures on the request.
    identities = make_identities([f"silo-{i}" for i in range(n)])
    me = identities["silo-0"]
    message = os.urandom(600)
    signature = me.sign(message)
    reps = 500

    def timed(step: Any) -> tuple[float, float]:
        started, started_cpu = time.perf_counter(), time.process_time()
        for _ in range(reps):
            step()
        return (time.perf_counter() - started) / reps, (time.process_time() - started_cpu) / reps

    sign_s, sign_cpu = timed(lambda: me.sign(message))
    verify_s, verify_cpu = timed(lambda: me.verify("silo-0", me.public, message, signature))
    t = SecAggParams().threshold_for(n)
    per_worker = 2 * sign_s + (n - 1 + t - 1) * verify_s
    per_worker_cpu = 2 * sign_cpu + (n - 1 + t - 1) * verify_cpu
    unsigned = statistics.median(totals[False])
    signed_total = statistics.median(totals[True])
    unsigned_cpu = statistics.median(cpu[False])
    # The round's compute in one process is every worker's plus the coordinator's: n workers'
    # Ed25519 work is what the signed mode adds to it.
    added = n * per_worker
    added_cpu = n * per_worker_cpu
    return {
        "n": n,
        "d": d,
        "repeats": repeats,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "unsigned_round_seconds": round(unsigned, 4),
        "signed_round_seconds": round(signed_total, 4),
        "measured_difference_seconds": round(signed_total - unsigned, 4),
        "unsigned_round_cpu_seconds": round(unsigned_cpu, 4),
        "signed_round_cpu_seconds": round(statistics.median(cpu[True]), 4),
        "ed25519_sign_us": round(sign_s * 1e6, 1),
        "ed25519_verify_us": round(verify_s * 1e6, 1),
        "ed25519_sign_cpu_us": round(sign_cpu * 1e6, 1),
        "ed25519_verify_cpu_us": round(verify_cpu * 1e6, 1),
        "ed25519_seconds_per_round_all_workers": round(added, 5),
        "ed25519_share_of_round": round(added / unsigned, 5),
        "ed25519_cpu_share_of_round": round(added_cpu / unsigned_cpu, 5),
        "target_share_below": 0.05,
        "meets_target": added_cpu / unsigned_cpu < 0.05,
    }


# ---------------------------------------------------------------------------- in process


def _plain_aggregate_seconds(n: int, d: int) -> float:
    update = np.random.default_rng(0).normal(0, 0.01, d).astype(np.float32)
    aggregator = WeightedMeanAggregator()
    started = time.perf_counter()
    for _ in range(n):
        # The coordinator owns each received buffer; a copy stands in for the receive.
        aggregator.add({"w": update.copy()}, 10)
    aggregator.result()
    return time.perf_counter() - started


def measure_in_process(n: int, d: int, dropout: float, neighbours: int) -> dict[str, Any]:
    params = SecAggParams(neighbours=neighbours)
    dropped = set(range(math.floor(dropout * n)))
    delta = np.random.default_rng(n).normal(0, 0.01, d).astype(np.float32)
    sim = Simulation(params, [delta] * n, [10] * n, drop={"input": dropped}, keep_plain=False)
    started = time.perf_counter()
    try:
        result = sim.run()
    except SecAggAbortedError as exc:
        # SecAgg+ with too few neighbours for this dropout rate: a neighbourhood fell below t.
        return {
            "n": n,
            "d": d,
            "dropout": dropout,
            "graph": f"secagg+ k={params.degree(n)}",
            "threshold": params.threshold_for(n),
            "aborted": str(exc),
        }
    wall = time.perf_counter() - started
    error = float(np.abs(result.mean - delta).max())
    sharing = n  # workers that advertised and shared
    masking = n - len(dropped)
    t = sim.timings
    per_worker = {
        "keys": t["worker_keys"] / sharing,
        "shares": t["worker_shares"] / sharing,
        "quantize": t["worker_quantize"] / masking,
        "mask": t["worker_mask"] / masking,
        "unmask": t["worker_unmask"] / masking,
    }
    coordinator = {
        "keys": t["server_keys"],
        "shares": t["server_shares"],
        "sum_inputs": t["server_sum"],
        "unmask": t["server_unmask"],
    }
    b = sim.worker_bytes
    bytes_per_worker = {
        "keys": b["keys"] // sharing,
        "shares": b["shares"] // sharing,
        "masked_input": b["input"] // masking,
        "unmask": b["unmask"] // masking,
    }
    return {
        "n": n,
        "d": d,
        "dropout": dropout,
        "dropped": len(dropped),
        "graph": "complete" if params.degree(n) == n - 1 else f"secagg+ k={params.degree(n)}",
        "threshold": params.threshold_for(n),
        "ring_bits": 32 if result.ring_sum.dtype == np.uint32 else 64,
        "worker_seconds": {k: round(v, 5) for k, v in per_worker.items()},
        "worker_seconds_total": round(sum(per_worker.values()), 5),
        "coordinator_seconds": {k: round(v, 5) for k, v in coordinator.items()},
        "coordinator_seconds_total": round(sum(coordinator.values()), 5),
        "bytes_sent_per_worker": bytes_per_worker,
        "simulation_wall_seconds": round(wall, 3),
        "max_abs_error_of_mean": error,
        "plain": {
            "coordinator_seconds": round(_plain_aggregate_seconds(n, d), 5),
            "bytes_sent_per_worker": 4 * d,
        },
    }


# ---------------------------------------------------------------------------- breakdown


def _timed(step: Any, reps: int = 3) -> float:
    """Median milliseconds of ``step()`` (run once first: warm caches and allocator)."""
    step()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return round(1e3 * statistics.median(times), 2)


def measure_breakdown(n: int = 8, d: int = 1_000_000) -> dict[str, Any]:
    """Milliseconds per step of one secure round at ``n``, ``d``, in this process, with
    whichever fedcore it imported (old code has no mask expanded ahead, no blockwise update):
    a worker's share step, its mask expansion ahead of the update, its masking once the
    update is ready; the coordinator's streamed fold of the n inputs (2 MiB chunks), its
    unmasking (reconstruction and the self masks stripped) and the update it builds."""
    import random

    from fedcore.secagg.client import SecAggClient
    from fedcore.secagg.quantize import COUNT_WORDS
    from fedcore.secagg.ring import RingSum
    from fedcore.secagg.server import SecAggServer
    from fedcore.secagg.setup import make_setup
    from fedcore.server.engine import secagg_checks
    from fedcore.weights import signature_of

    setup = make_setup(SecAggParams(), n, 10 * n)
    fp = setup.fixed_point
    words = d + COUNT_WORDS
    delta = np.random.default_rng(0).normal(0, 0.01, d).astype(np.float32)
    global_weights = {"w": np.zeros(d, np.float32)}
    ahead = hasattr(SecAggClient, "prepare_mask")

    def ready_round() -> tuple[SecAggServer, dict[int, Any]]:
        clients = {u: SecAggClient(setup) for u in range(1, n + 1)}
        server = SecAggServer(setup, n, words, rng=random.Random(0))
        for u, c in clients.items():
            server.add_keys(u, c.advertise())
        directories = server.close_keys()
        for u, c in clients.items():
            server.add_shares(u, c.share_keys(directories[u]))
        inboxes = server.close_shares()
        for u, c in clients.items():
            c.receive_shares(inboxes[u])
        return server, clients

    def shares() -> None:  # every worker's keys and shares, and the coordinator's relay
        ready_round()

    def expand() -> None:
        _, clients = ready_round()
        started = time.perf_counter()
        if ahead:
            clients[1].prepare_mask(words)
        expand_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        clients[1].mask(delta, 10)
        mask_s.append(time.perf_counter() - started)

    expand_s: list[float] = []
    mask_s: list[float] = []
    shares_ms = _timed(shares)
    for _ in range(4):
        expand()
    masked: list[Any] = []
    server, clients = ready_round()
    for c in clients.values():
        if ahead:
            c.prepare_mask(words)
        masked.append(c.mask(delta, 10).vector.tobytes())
    chunk = 2 * 1024 * 1024

    def fold() -> None:
        ring = RingSum(words, fp.dtype)
        for u, data in enumerate(masked, start=1):
            stream = ring.open(u, lambda index: True)
            step = chunk // fp.dtype.itemsize
            for start in range(0, words, step):
                piece = np.frombuffer(data, fp.dtype, min(step, words - start), start * 4)
                stream.fold("", start, piece)
            stream.commit()

    fold_ms = _timed(fold)
    for u, data in enumerate(masked, start=1):
        server.add_masked(u, np.frombuffer(data, fp.dtype).copy())
    request = server.close_inputs()
    for u in server.recipients_of_shares_request():
        server.add_unmask(u, clients[u].unmask(request))
    started = time.perf_counter()
    result = server.finish()
    finish_ms = round(1e3 * (time.perf_counter() - started), 2)

    def update() -> None:
        if hasattr(secagg_checks, "bounded_update"):
            signature = signature_of(global_weights)
            secagg_checks.bounded_update(
                1, result.words, fp, result.weight_norm, 10 * n, global_weights, signature
            )
        else:
            mean = secagg_checks.bounded_mean(
                1,
                fp.decode(result.ring_sum[:d]),
                result.weight_norm,
                10 * n,
                clip=fp.clip,
                step=1 / fp.scale,
            )
            g = global_weights["w"]
            (g.astype(np.float64) + mean).astype(g.dtype)

    return {
        "n": n,
        "d": d,
        "imported": str(Path(sys.modules[SecAggClient.__module__].__file__ or "").resolve()),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "worker_ms": {
            "keys_and_shares_whole_round": shares_ms,
            "mask_expanded_ahead": round(1e3 * statistics.median(expand_s[1:]), 2),
            "masking_once_trained": round(1e3 * statistics.median(mask_s[1:]), 2),
        },
        "coordinator_ms": {
            "fold_all_inputs": fold_ms,
            "unmask": finish_ms,
            "update": _timed(update),
        },
    }


# ---------------------------------------------------------------------------- processes


def _phases(log_path: Path) -> list[dict[str, float]]:
    """The coordinator's seconds per secure phase, one dict per round, from its JSON log (the
    ``secagg_aggregated`` line's message, which old code writes too)."""
    rounds: list[dict[str, float]] = []
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        if '"secagg_aggregated"' not in line:
            continue
        match = _PHASES.search(json.loads(line).get("message", ""))
        if match:
            rounds.append({k: float(v) for k, v in _PHASE.findall(match.group(1))})
    return rounds


def measure_processes(
    workers: int,
    params: int,
    rounds: int,
    tmp: Path,
    *,
    secagg: bool,
    signed: bool = False,
    tree: Path | None = None,
    link: tuple[float, float] | None = None,
    train_seconds: float = 0.0,
) -> dict[str, Any]:
    """One federation of ``1 + rounds`` rounds of echo workers; the timed rounds' metrics
    (``signed``: the signed secure-aggregation mode, keys from ``fed-certs``; ``tree``: the
    fedcore every process runs, None for this one; ``link``: (RTT ms, Mbit/s) of an emulated
    link in front of each worker, as ``bench_wan.py`` builds them, None for loopback;
    ``train_seconds``: each worker's fit takes that long, as training would, before echoing)."""
    kind = "signed" if signed else "secure" if secagg else "plain"
    tag = f"{kind}-{workers}-{params}-{'old' if tree is not None else 'new'}"
    tmp.mkdir(parents=True, exist_ok=True)
    certs = tmp / f"certs-{tag}"
    if signed:
        from fedcore.certs_cli import main as fed_certs

        names = ",".join(f"e{i}" for i in range(workers))
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON report
            if fed_certs(["init", "--dir", str(certs), "--workers", names]) != 0:
                raise RuntimeError("fed-certs init failed")
    metrics_path = tmp / f"metrics-{tag}.jsonl"
    timeout = overhead._transfer_timeout(workers, 8 * params, rounds + 1)
    if link is not None:  # every transfer in turn at the link's rate, twice over
        timeout += 2 * (rounds + 1) * workers * (8 * 8 * params / (link[1] * 1e6) + link[0] / 1e3)
    children: list[benchlib.Child] = []
    argv = [
        str(benchlib.LIBRARY), "run-module", "fedcore.server", "--listen", "127.0.0.1:0",
        "--model", "vector", "--model-params", json.dumps({"size": params}),
        "--min-workers", str(workers), "--rounds", str(rounds + 1), "--fed-eval-every", "0",
        "--metrics-out", str(metrics_path), "--round-timeout", "600",
        "--join-timeout", str(overhead._START_TIMEOUT), "--log-json",
    ]  # fmt: skip
    if secagg:
        argv.append("--secagg")
    if signed:
        argv.append("--secagg-signed")
    with benchlib.neutral_folder() as cwd, contextlib.ExitStack() as stack:
        try:
            env = benchlib.code_env(tree)
            server_log = tmp / f"server-{tag}.log"
            server = benchlib.Child(
                "fed-server", benchlib.python(*argv), server_log, cwd=cwd, env=env
            )
            children.append(server)
            server.check_imports(tree or benchlib.REPO, overhead._START_TIMEOUT)
            address = server.wait_for_line(overhead.LISTENING, overhead._START_TIMEOUT)
            dials = [address] * workers
            if link is not None:
                import bench_wan

                net = bench_wan.Net(link[0], (link[1],) * workers)
                links = bench_wan.Links(net, tmp / f"links-{tag}.log", cwd)
                stack.callback(links.close)
                dials = links(address, workers)
            for i, dial in enumerate(dials):
                # The model must change every round: a worker masks one update per global
                # model (and plain rounds pay the same copy).
                role = (
                    [
                        str(overhead.SCRIPT), "echo-worker", "--server", dial, "--name", f"e{i}",
                        "--step", "1e-3", *(["--certs", str(certs)] if signed else []),
                    ]
                    if not train_seconds
                    else [str(SCRIPT), "--training-worker", dial, f"e{i}", str(train_seconds)]
                )  # fmt: skip
                children.append(
                    benchlib.Child(
                        f"echo worker {i}",
                        benchlib.python(*role),
                        tmp / f"echo-{tag}-{i}.log",
                        cwd=cwd,
                        env=env,
                    )
                )
            for child in children[1:]:
                child.check_imports(tree or benchlib.REPO, overhead._START_TIMEOUT)
            benchlib.wait_all(server, children[1:], timeout)
        finally:
            for child in reversed(children):
                child.stop()
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    timed = [r for r in rows if r["round"] > 1]
    phases = _phases(server_log)[1:]  # the timed rounds
    return {
        "seconds_per_round": statistics.median(r["fit_s"] for r in timed),
        "coordinator_phase_seconds": {
            k: round(statistics.median(p.get(k, 0.0) for p in phases), 4)
            for k in (phases[0] if phases else {})
        },
        "round_seconds": [r["fit_s"] for r in rows],
        "bytes_received_per_round": statistics.median(r["bytes_received"] for r in timed),
        "bytes_sent_per_round": statistics.median(r["bytes_sent"] for r in timed),
        "workers_per_round": [r["workers"] for r in rows],
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rows),
    }


# ---------------------------------------------------------------------------- main


def _count(text: str) -> int:
    value = float(text)
    if value < 1 or not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="n in {4,8,16}, d in {1e5,1e6}, dropout {0,0.3}"
    )
    p.add_argument("--workers", type=_count, nargs="*", help="n in process (none: skip)")
    p.add_argument("--sizes", type=_count, nargs="*", help="d for the in-process grid")
    p.add_argument("--dropouts", type=float, nargs="*", help="dropout rates")
    p.add_argument("--process-workers", type=_count, nargs="*", help="n over real processes")
    p.add_argument("--process-sizes", type=_count, nargs="*", help="d over real processes")
    p.add_argument("--rounds", type=_count, help="timed rounds after one warm-up round")
    p.add_argument("--no-secagg-plus", action="store_true", help="complete graph only")
    p.add_argument("--out", type=Path, help="also write the JSON report here")
    p.add_argument(
        "--old-code",
        metavar="GIT_REF",
        help="also run the process rounds with this commit's fedcore, alternated with this one",
    )
    p.add_argument(
        "--code",
        metavar="GIT_REF",
        help="run the new side's process rounds with this commit's fedcore (default: this tree)",
    )
    p.add_argument(
        "--link",
        nargs=2,
        type=float,
        metavar=("RTT_MS", "MBIT"),
        help="process rounds with each worker behind an emulated link (bench_wan.py's)",
    )
    p.add_argument(
        "--train-seconds",
        type=float,
        default=0.0,
        help="process rounds whose workers take this long to 'train' (sleep) before echoing",
    )
    p.add_argument("--training-worker", nargs=3, help=argparse.SUPPRESS)
    p.add_argument(
        "--pairs", type=_count, default=1, help="process measurements per code (alternated)"
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="only the per-step milliseconds of a round at n=8, d=1e6 (old code too, with "
        "--old-code), each code in its own process",
    )
    p.add_argument("--breakdown-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--processes-only",
        action="store_true",
        help="skip the masking throughput and in-process sections (the signed mode's cost too)",
    )
    p.add_argument(
        "--signatures-only", action="store_true", help="only the signed mode's cost (n=8, d=1e6)"
    )
    p.add_argument(
        "--signed-processes",
        action="store_true",
        help="with --signatures-only: also real processes, --secagg vs --secagg-signed",
    )
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    # A flag given on the command line replaces the preset's value.
    given = {
        key: getattr(args, key)
        for key in Preset.__annotations__
        if getattr(args, key, None) is not None
    }
    # argparse's values are Any: the flags have the preset's types.
    preset = cast(Preset, {**(_QUICK if args.quick else _FULL), **given})
    started = time.perf_counter()
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "settings": preset,
    }

    def save() -> None:
        if args.out is not None:  # after every measurement: a cut-short run keeps its figures
            args.out.write_text(json.dumps(report, indent=2) + "\n")

    if not args.processes_only:
        _progress("signed mode: n=8 d=1e6")
        report["signatures"] = measure_signatures()
        save()
    if args.signatures_only:
        if args.signed_processes:
            with tempfile.TemporaryDirectory(prefix="bench-secagg-") as tmp:
                runs: dict[str, Any] = {}
                for _ in range(2):  # alternated, so both see the same load
                    for mode in ("secure", "signed"):
                        _progress(f"processes: n=8 d=1e6 {mode}")
                        runs.setdefault(mode, []).append(
                            measure_processes(
                                8,
                                1_000_000,
                                preset["rounds"],
                                Path(tmp) / f"{mode}-{len(runs.get(mode, []))}",
                                secagg=True,
                                signed=mode == "signed",
                            )["seconds_per_round"]
                        )
                        report["signatures"]["processes_seconds_per_round"] = runs
                        save()
        return report
    if not args.processes_only:
        _progress("masking throughput")
        report["masking"] = measure_masking()
        grid: list[dict[str, Any]] = []
        report["in_process"] = grid
        for d in preset["sizes"]:
            for n in preset["workers"]:
                graphs = [0]
                k = 2 * math.ceil(math.log2(n))
                if not args.no_secagg_plus and k < n - 1:
                    graphs.append(k)
                for neighbours in graphs:
                    for dropout in preset["dropouts"]:
                        _progress(
                            f"in process: n={n} d={d} dropout={dropout} k={neighbours or 'all'}"
                        )
                        grid.append(measure_in_process(n, d, dropout, neighbours))
                        save()
    processes: list[dict[str, Any]] = []
    report["processes"] = processes
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-secagg-")))
        new = None if args.code is None else stack.enter_context(benchlib.old_code(args.code))
        codes: list[tuple[str, Path | None]] = [("new", new)]
        if args.old_code is not None:
            # Old first in each pair, then new: alternated, so both see the same load.
            codes.insert(0, ("old", stack.enter_context(benchlib.old_code(args.old_code))))
        for d in preset["process_sizes"]:
            for n in preset["process_workers"]:
                for pair in range(args.pairs):
                    for code, tree in codes:
                        entry: dict[str, Any] = {"n": n, "d": d, "code": code, "pair": pair}
                        if args.link is not None:
                            entry["link"] = {"rtt_ms": args.link[0], "mbit": args.link[1]}
                        entry["train_seconds"] = args.train_seconds
                        entry["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
                        for secure in (False, True):
                            what = "secure" if secure else "plain"
                            _progress(f"processes: n={n} d={d} {code} {what} (pair {pair})")
                            entry[what] = measure_processes(
                                n, d, preset["rounds"], work / f"{code}-{pair}", secagg=secure,
                                tree=tree, link=None if args.link is None else tuple(args.link),
                                train_seconds=args.train_seconds,
                            )  # fmt: skip
                        ratio = (
                            entry["secure"]["seconds_per_round"]
                            / entry["plain"]["seconds_per_round"]
                        )
                        entry["secure_over_plain"] = round(ratio, 3)
                        entry["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
                        processes.append(entry)
                        save()
    target = [
        e["secure_over_plain"]
        for e in processes
        if e["n"] == 8 and e["d"] == 1_000_000 and e["code"] == "new"
    ]
    report["targets"] = {
        "masking_mb_per_s_at_least_500": report.get("masking", {}).get("meets_target"),
        "secure_round_at_most_1.3x_plain_at_n8_d1e6": (
            None if not target else statistics.median(target) <= 1.3
        ),
    }
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    save()
    return report


def breakdown(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`measure_breakdown` in a child per code (old first, then new, ``--pairs`` times)."""
    report: dict[str, Any] = {"n": 8, "d": 1_000_000, "runs": []}
    with contextlib.ExitStack() as stack:
        codes: list[tuple[str, Path | None]] = [
            (
                "new",
                None if args.code is None else stack.enter_context(benchlib.old_code(args.code)),
            )
        ]
        if args.old_code is not None:
            codes.insert(0, ("old", stack.enter_context(benchlib.old_code(args.old_code))))
        cwd = stack.enter_context(benchlib.neutral_folder())
        for _ in range(args.pairs):
            for code, tree in codes:
                _progress(f"breakdown: {code}")
                out = subprocess.run(
                    benchlib.python(str(Path(__file__).resolve()), "--breakdown-child"),
                    cwd=cwd,
                    env=benchlib.code_env(tree),
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                run = json.loads(out)
                root = (tree or benchlib.REPO).resolve()
                if not Path(run["imported"]).is_relative_to(root):
                    raise benchlib.BenchError(f"the {code} breakdown imported {run['imported']}")
                report["runs"].append({"code": code, **run})
                if args.out is not None:
                    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def training_worker_main(server: str, name: str, seconds: float) -> int:
    """An echo worker whose fit takes ``seconds`` first (in its thread, as training would):
    what the secure phases may overlap."""
    import asyncio

    from fedcore.worker import EchoTrainer, Worker

    class Training(EchoTrainer):
        def fit(self, model: Any, weights: Any, config: Any) -> Any:
            time.sleep(seconds)
            return super().fit(model, weights, config)

    benchlib.report_imports()
    overhead._worker_heap()
    asyncio.run(Worker(server, name, Training(1e-3), give_up_after=60.0).run())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.training_worker:
        server, name, seconds = args.training_worker
        return training_worker_main(server, name, float(seconds))
    if args.breakdown_child:
        print(json.dumps(measure_breakdown()))
        return 0
    report = breakdown(args) if args.breakdown else run(args)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
