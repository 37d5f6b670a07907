"""``fed-sim``: a whole federation on one machine or a Ray cluster, with the deployment's code.

It takes every ``fed-server`` flag (they configure the same coordinator) plus the flags of
the simulated side: the clients' data split, the worker settings ``fed-worker`` would take,
and the engine that hosts the virtual workers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from fedcore.cli_support import configure_logging, parse_args_with_config, run_cli
from fedcore.errors import ConfigError
from fedcore.server.cli import build_parser as server_parser
from fedcore.server.cli import config_from_args

from .clients import DataSpec, WorkerSettings
from .driver import SimulationResult, simulate
from .engines import Engine, LocalEngine, RayEngine

__all__ = ["build_parser", "main"]

log = logging.getLogger("fedcore.simulation")

_DESCRIPTION = """\
Simulate a federation of --num-clients virtual workers. The coordinator is fed-server's (every
fed-server flag below works the same); each virtual worker is fed-worker's runtime with its own
shard, state, optimizer, DP-SGD accountant and policy ledger, many of them hosted per process
and connected to the coordinator over the same gRPC protocol on 127.0.0.1. Data is split with
fed-data's schemes. A virtual worker keeps no model between its tasks, so memory follows the
number of clients training at once (--hosts x --concurrency), not --num-clients.
"""

_EPILOG = """\
examples:
  fed-sim --num-clients 100 --model mnist-cnn --rounds 20 --epochs 5 --batch-size 10 \\
      --lr 0.1 --strategy-options '{"fraction-fit": 0.1}' --eval-data test.npz
  fed-sim --num-clients 100 --partition shards --classes-per-shard 2 --hosts 2
  fed-sim --num-clients 1000 --model logreg --engine ray --ray-address auto \\
      --ray-cpus-per-host 0.5 --hosts 8
  fed-sim --num-clients 20 --secagg --dp-mode distributed --dp-noise-multiplier 0.5

What differs from a deployment: --listen defaults to 127.0.0.1:0 and --min-workers to
--num-clients; TLS and enrollment flags are refused (the simulation talks plaintext on
loopback); each virtual worker's privacy ledger is NAME.json in --ledger-dir.
"""


def build_parser() -> argparse.ArgumentParser:
    p = server_parser()
    p.prog = "fed-sim"
    p.description = _DESCRIPTION
    p.epilog = _EPILOG
    p.set_defaults(listen="127.0.0.1:0", min_workers=0, progress="plain")
    for action in p._actions:  # argparse keeps no public handle on an added argument
        if action.dest == "min_workers":
            action.help = "workers that must be connected before round 1 (default: --num-clients)"
    d = p.add_argument_group("simulated clients' data (fed-data's split)")
    d.add_argument(
        "--num-clients", type=int, required=True, help="virtual workers to simulate (required)"
    )
    d.add_argument(
        "--data",
        type=Path,
        help="training data to split: .npz with x, y, or a folder of MNIST IDX files "
        "(default: the bundled MNIST training set)",
    )
    d.add_argument("--num-examples", type=int, help="use only the first N training examples")
    d.add_argument(
        "--partition",
        choices=["iid", "dirichlet", "shards"],
        default="iid",
        help="split scheme, as fed-data split --scheme (default: %(default)s)",
    )
    d.add_argument(
        "--alpha", type=float, default=0.5, help="dirichlet alpha (default: %(default)s)"
    )
    d.add_argument(
        "--classes-per-shard",
        type=int,
        default=2,
        help="most classes per client with --partition shards (default: %(default)s)",
    )
    d.add_argument(
        "--partition-seed", type=int, default=0, help="seed of the split (default: %(default)s)"
    )
    w = p.add_argument_group("virtual workers (what fed-worker would be told)")
    w.add_argument(
        "--worker-device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)"
    )
    w.add_argument(
        "--worker-threads",
        type=int,
        default=1,
        help="torch threads per host; 1 makes training deterministic (default: %(default)s)",
    )
    w.add_argument("--dpsgd-noise-multiplier", type=float, help="as fed-worker (default: off)")
    w.add_argument("--dpsgd-clip", type=float, default=1.0, help="(default: %(default)s)")
    w.add_argument("--dpsgd-delta", type=float, default=1e-5, help="(default: %(default)s)")
    w.add_argument("--dpsgd-max-epsilon", type=float, help="each silo's budget (default: none)")
    w.add_argument(
        "--policy",
        type=Path,
        metavar="POLICY.toml",
        help="every virtual worker enforces this data owner's policy",
    )
    w.add_argument(
        "--ledger-dir",
        type=Path,
        help="where each virtual worker keeps its privacy ledger NAME.json (default: a "
        "fresh temporary folder, so every simulation starts with full budgets)",
    )
    e = p.add_argument_group("engine")
    e.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: host processes on this machine; ray: Ray actors (default: %(default)s)",
    )
    e.add_argument(
        "--hosts",
        type=int,
        default=min(os.cpu_count() or 1, 8),
        help="processes (or actors) that host the virtual workers (default: %(default)s, "
        "the CPU count up to 8)",
    )
    e.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="virtual workers of one host that train at once (default: %(default)s)",
    )
    e.add_argument(
        "--advertise",
        default=None,
        metavar="HOST",
        help="the address hosts connect to (default: the --listen host, 127.0.0.1 for a "
        "wildcard); on a Ray cluster, this machine's address",
    )
    e.add_argument(
        "--ray-address",
        help="a running Ray cluster (ray start --head; 'auto' finds it); default: start a "
        "private local Ray instance",
    )
    e.add_argument(
        "--ray-cpus-per-host",
        type=float,
        default=1.0,
        help="CPUs each host actor declares (default: %(default)s)",
    )
    e.add_argument(
        "--ray-gpus-per-host",
        type=float,
        default=0.0,
        help="GPUs each host actor declares; fractions share a GPU (default: %(default)s)",
    )
    e.add_argument(
        "--report",
        type=Path,
        help="write a JSON summary here: seconds per round, peak memory of every process",
    )
    return p


def _refuse_deployment_only(args: argparse.Namespace) -> None:
    for flag in ("tls_cert", "tls_key", "tls_client_ca", "enrolled"):
        if getattr(args, flag) is not None:
            raise ConfigError(
                f"--{flag.replace('_', '-')} is not supported by fed-sim: virtual workers "
                "talk to the coordinator in plaintext on this machine's loopback"
            )


def _engine(args: argparse.Namespace) -> Engine:
    if args.engine == "ray":
        return RayEngine(
            address=args.ray_address,
            num_cpus=args.ray_cpus_per_host,
            num_gpus=args.ray_gpus_per_host,
        )
    if args.ray_address is not None:
        raise ConfigError("--ray-address needs --engine ray")
    return LocalEngine()


def _advertised(args: argparse.Namespace) -> str:
    if args.advertise:
        return str(args.advertise)
    host = str(args.listen).rsplit(":", 1)[0].strip("[]")
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("fed-sim", lambda: _run(argv))


def _run(argv: Sequence[str] | None) -> None:
    args = parse_args_with_config(build_parser(), argv)
    configure_logging(args, "fed-sim")
    _refuse_deployment_only(args)
    if args.min_workers == 0:
        args.min_workers = args.num_clients
    data = DataSpec(
        num_clients=args.num_clients,
        source=str(args.data) if args.data is not None else None,
        max_examples=args.num_examples,
        scheme=args.partition,
        seed=args.partition_seed,
        alpha=args.alpha,
        classes_per_shard=args.classes_per_shard,
    )
    config = config_from_args(args)
    engine = _engine(args)
    if args.ledger_dir is not None:
        args.ledger_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fed-sim-ledgers-") as scratch:
        workers = WorkerSettings(
            device=args.worker_device,
            threads=args.worker_threads,
            dpsgd_noise_multiplier=args.dpsgd_noise_multiplier,
            dpsgd_clip=args.dpsgd_clip,
            dpsgd_delta=args.dpsgd_delta,
            dpsgd_max_epsilon=args.dpsgd_max_epsilon,
            policy=str(args.policy.resolve()) if args.policy is not None else None,
            ledger_dir=str((args.ledger_dir or Path(scratch)).resolve()),
        )
        result = asyncio.run(
            simulate(
                config,
                data,
                engine,
                num_hosts=args.hosts,
                workers=workers,
                concurrency=args.concurrency,
                advertise=_advertised(args),
                log_level="WARNING" if args.quiet or args.log_level != "DEBUG" else "DEBUG",
            )
        )
    _print_summary(result, args.report)


def _print_summary(result: SimulationResult, report: Path | None) -> None:
    summary = result.summary()
    line = json.dumps(summary)
    print(f"simulation {line}", flush=True)
    if report is not None:
        report.write_text(json.dumps(summary, indent=2) + "\n")
    if result.errors:
        log.warning("%d virtual worker(s) ended with an error", len(result.errors))


if __name__ == "__main__":
    sys.exit(main())
