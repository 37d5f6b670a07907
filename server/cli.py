"""``fed-server``: run a federation's coordinator."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

from fedcore.cli_support import add_common_flags, configure_logging, parse_args_with_config, run_cli
from fedcore.compression import SCHEMES
from fedcore.console import ConsoleSettings, add_console_flags, console_settings_from_args
from fedcore.errors import ConfigError
from fedcore.heap import return_freed_memory
from fedcore.models import available_models
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.protocol import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MODEL_BYTES, max_message_bytes
from fedcore.secagg import SecAggParams
from fedcore.strategy import describe_strategies
from fedcore.tls import ServerTLS

from .coordinator import Coordinator
from .network import Network, NetworkSettings
from .plans import add_plan_flags, plan_from_args
from .state.analytics import add_analytics_flags, analytics_settings_from_args
from .state.config import Limits, ServerConfig
from .state.privacy import add_dp_flags, dp_settings_from_args

__all__ = ["build_parser", "main"]

log = logging.getLogger("fedcore.server")

_DESCRIPTION = """\
Run a fedcore coordinator. It waits for --min-workers workers (started with fed-worker
--server HOST:PORT), runs --rounds rounds of federated training of --model, and tells the
workers to shut down when done. With --serve it runs a standing network instead: workers
join once and stay, data scientists submit jobs with fed-job (docs/network.md). Prints
"listening on HOST:PORT" once ready.
"""

_EPILOG = f"""\
strategies (--strategy NAME, options as --strategy-options JSON or a [strategy] table):
{describe_strategies()}

examples:
  fed-server --listen 127.0.0.1:50051 --min-workers 3 --rounds 3 --eval-data shards/test.npz
  fed-server --config federation.toml --metrics-out metrics.jsonl --save-model model.safetensors
  fed-server --strategy fedadam --strategy-options '{{"server-lr": 0.03}}'
  fed-server --strategy my_package.strategies:MyStrategy

  # federation.toml
  rounds = 20
  [strategy]
  name = "trimmed-mean"
  beta = 0.2
  fraction-fit = 0.5
  fed-server --min-workers 8 --secagg --secagg-neighbours 6 --secagg-clip 0.5
  fed-server --min-workers 100 --dp-target-epsilon 8 --rounds 50 --dp-clip 0.5
  fed-server --min-workers 8 --secagg --dp-mode distributed --dp-noise-multiplier 1.0
  fed-server --serve --state-dir state --scientists certs/scientists.json
  fed-server audit verify state/audit.log
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fed-server",
        # A mistyped flag then shows one usage line above the error, not forty; --help
        # lists every option.
        usage="%(prog)s [options]",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("federation")
    g.add_argument(
        "--listen",
        default="127.0.0.1:50051",
        metavar="HOST:PORT",
        help="address to serve on, port included (0 picks a free one); a port another process "
        "holds is refused (default: %(default)s)",
    )
    g.add_argument(
        "--model",
        default="mnist-cnn",
        help=f"model to train: {', '.join(available_models())}, or package.module:factory (default: %(default)s)",
    )
    g.add_argument(
        "--model-params",
        default="{}",
        metavar="JSON",
        help="model hyper-parameters as a JSON object, e.g. '{\"hidden\": 100}'",
    )
    g.add_argument("--rounds", type=int, default=3, help="training rounds (default: %(default)s)")
    g.add_argument(
        "--min-workers",
        type=int,
        default=2,
        help="workers that must be connected before round 1 (default: %(default)s)",
    )
    g.add_argument(
        "--min-results",
        type=int,
        help="valid results a round needs to count; later rounds start once this many workers "
        "are ready (default: --min-workers)",
    )
    g.add_argument(
        "--strategy",
        default="fedavg",
        metavar="NAME",
        help="aggregation strategy: a built-in name (listed below) or package.module:Class "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--strategy-options",
        default="{}",
        metavar="JSON",
        help="the strategy's options as a JSON object, e.g. '{\"server-lr\": 0.1}' "
        "(or a [strategy] table in --config)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initial model and of local shuffling (default: %(default)s)",
    )
    g.add_argument(
        "--require-tag",
        action="append",
        default=[],
        metavar="TAG",
        help="select only workers whose dataset metadata carries this tag (e.g. mnist or "
        "'#mnist'); repeat for several; others stay connected and listed but never train",
    )
    g.add_argument(
        "--trainable",
        action="append",
        default=[],
        metavar="PATTERN",
        help="train only the parameters whose names match this pattern (fnmatch, e.g. "
        "'net.3.*'; repeat for several), or @requires-grad: those the model factory leaves "
        "trainable (LoRA adapters from peft); the rest is frozen and sent to each worker once "
        "(default: the whole model trains)",
    )
    t = p.add_argument_group("local training (sent to workers in every plan)")
    t.add_argument(
        "--epochs", type=int, default=1, help="local epochs per round (default: %(default)s)"
    )
    t.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    t.add_argument(
        "--optimizer", choices=["sgd", "adam"], default="sgd", help="(default: %(default)s)"
    )
    t.add_argument("--lr", type=float, default=0.05, help="learning rate (default: %(default)s)")
    t.add_argument(
        "--momentum", type=float, default=0.0, help="SGD momentum (default: %(default)s)"
    )
    t.add_argument("--weight-decay", type=float, default=0.0, help="(default: %(default)s)")
    t.add_argument(
        "--compression",
        choices=list(SCHEMES),
        default="none",
        help="workers send their update as a float16 delta (2x fewer bytes) or an int8 delta "
        "with one scale per tensor (about 4x fewer), keeping the rounding error for their next "
        "update (error feedback); the coordinator validates and restores float32 before "
        "aggregating (default: %(default)s)",
    )
    e = p.add_argument_group("evaluation and output")
    e.add_argument(
        "--eval-data",
        type=Path,
        help="test set for centralized evaluation (.npz with x, y, or an IDX directory)",
    )
    e.add_argument(
        "--fed-eval-every",
        type=int,
        help="federated evaluation on the workers every N rounds (0 = never; default: every round without --eval-data, else never)",
    )
    e.add_argument("--metrics-out", type=Path, help="write one JSON object per round to this file")
    e.add_argument(
        "--save-model", type=Path, help="write the final global weights here (safetensors)"
    )
    e.add_argument(
        "--progress",
        choices=["auto", "live", "plain"],
        default="auto",
        help="live: a progress panel redrawn in place and a summary table at the end; plain: a "
        "table row per round and a 'summary key=value ...' line, for scripts; auto: live when "
        "stdout is a terminal (default: %(default)s)",
    )
    e.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on http://LISTEN-HOST:PORT/metrics (rounds, workers, "
        "bytes, round durations, accuracy, epsilon); 0 picks a free port (default: off)",
    )
    e.add_argument(
        "--mlflow-uri",
        metavar="URI",
        help="log the settings and every round's metrics to an MLflow tracking store, e.g. "
        "sqlite:///mlflow.db or http://host:5000 (needs fedcore[tracking])",
    )
    e.add_argument(
        "--mlflow-experiment",
        default="fedcore",
        metavar="NAME",
        help="the MLflow experiment of the run (default: %(default)s)",
    )
    e.add_argument(
        "--tensorboard-dir",
        type=Path,
        metavar="DIR",
        help="write every round's metrics as TensorBoard event files here "
        "(tensorboard --logdir DIR; needs fedcore[tracking])",
    )
    e.add_argument("--threads", type=int, help="torch threads for centralized evaluation")
    e.add_argument(
        "--device", default="cpu", help="device for centralized evaluation (default: %(default)s)"
    )
    r = p.add_argument_group("timeouts and limits")
    r.add_argument(
        "--round-timeout",
        type=float,
        default=600.0,
        help="seconds a round waits for results (default: %(default)s)",
    )
    r.add_argument(
        "--round-retries",
        type=int,
        default=3,
        help="retries of a round with too few results (default: %(default)s)",
    )
    r.add_argument(
        "--approval-timeout",
        type=float,
        default=Limits.approval_timeout,
        help="seconds a round waits for a worker whose data owner has not yet approved the plan "
        "(its other results are kept; 0: do not wait) (default: %(default)s)",
    )
    r.add_argument(
        "--approval-poll",
        type=float,
        default=Limits.approval_poll,
        help="most seconds between two asks of a worker awaiting its owner's approval (the "
        "first after 2 s, then doubling) (default: %(default)s)",
    )
    r.add_argument(
        "--join-timeout",
        type=float,
        help="seconds to wait for --min-workers before round 1 (default: forever)",
    )
    r.add_argument(
        "--heartbeat-interval",
        type=float,
        default=5.0,
        help="seconds between worker heartbeats (default: %(default)s)",
    )
    r.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=60.0,
        help="drop a worker silent this long (default: %(default)s)",
    )
    r.add_argument(
        "--upload-idle-timeout",
        type=float,
        default=30.0,
        help="drop a worker whose upload holds an upload slot this long without sending a "
        "chunk, so one stalled connection cannot block the others (default: %(default)s)",
    )
    r.add_argument(
        "--handshake-timeout",
        type=float,
        default=10.0,
        help="seconds a new stream has to send its hello (default: %(default)s)",
    )
    r.add_argument(
        "--chunk-bytes",
        type=int,
        default=DEFAULT_CHUNK_BYTES,
        help="payload chunk size; bounds every gRPC message (default: %(default)s)",
    )
    r.add_argument(
        "--max-model-bytes",
        type=int,
        default=DEFAULT_MAX_MODEL_BYTES,
        help="largest model or update accepted (default: %(default)s)",
    )
    r.add_argument(
        "--max-workers",
        type=int,
        default=1000,
        help="most workers connected at once (default: %(default)s)",
    )
    r.add_argument(
        "--upload-slots",
        type=int,
        default=1,
        help="updates staged whole in memory at once besides the running sum (default: "
        "%(default)s); uploads to a streaming strategy (the FedAvg family) take no slot: they "
        "are folded into the sum chunk by chunk, all at once",
    )
    h = p.add_argument_group("limits against hostile workers (see docs/coordinator-hardening.md)")
    h.add_argument(
        "--max-pending-handshakes",
        type=int,
        default=128,
        help="streams open at once that have not sent their hello yet; more are refused "
        "(default: %(default)s)",
    )
    h.add_argument(
        "--max-pending-per-host",
        type=int,
        default=32,
        help="the same, per peer host (default: %(default)s)",
    )
    h.add_argument(
        "--handshake-rate",
        type=float,
        default=20.0,
        metavar="PER_S",
        help="new streams per second one host may open on average; 0 = unlimited "
        "(default: %(default)s)",
    )
    h.add_argument(
        "--handshake-burst",
        type=int,
        default=100,
        help="new streams one host may open at once after a quiet period (default: %(default)s)",
    )
    h.add_argument(
        "--max-streams-per-connection",
        type=int,
        default=8,
        help="HTTP/2 streams one connection may have open (default: %(default)s)",
    )
    h.add_argument(
        "--max-connection-idle",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="close a connection without any RPC for this long; 0 = never (default: %(default)s)",
    )
    h.add_argument(
        "--max-connection-age",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="after this long a connection may open no new stream (its open streams go on); "
        "0 = never (default: %(default)s)",
    )
    h.add_argument(
        "--upload-min-rate",
        type=float,
        default=16384.0,
        metavar="BYTES_PER_S",
        help="an upload that holds an upload slot longer than --upload-idle-timeout must "
        "average at least this rate, or its worker is dropped; 0 = no minimum "
        "(default: %(default)s)",
    )
    h.add_argument(
        "--max-examples",
        type=int,
        default=10_000_000,
        help="most examples one worker may claim: a hello above it is clamped, and a result "
        "claiming more than its hello (or this) is clamped, logged, and still aggregated "
        "(default: %(default)s)",
    )
    h.add_argument(
        "--enrollment-poll",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how often the --enrolled file is re-read; a revoked or removed worker is "
        "disconnected at the next check (default: %(default)s)",
    )
    s = p.add_argument_group("security (see fed-certs --help)")
    s.add_argument("--tls-cert", type=Path, help="the coordinator's TLS certificate (PEM)")
    s.add_argument("--tls-key", type=Path, help="the private key of --tls-cert (PEM)")
    s.add_argument(
        "--tls-client-ca",
        type=Path,
        help="mutual TLS: workers must present a certificate signed by this CA (PEM); its "
        "common name is the worker's identity",
    )
    s.add_argument(
        "--enrolled",
        type=Path,
        help="enrolled workers (JSON written by fed-certs): only they may join, proving their "
        "name with a token and/or their mTLS certificate; re-read when it changes",
    )
    s.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext, or no worker authentication, on an address other machines can "
        "reach (default: refused)",
    )
    c = p.add_argument_group("crash recovery")
    c.add_argument(
        "--checkpoint-dir",
        type=Path,
        help="write the global model, strategy state, round number and metrics here "
        "atomically after every round",
    )
    c.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --checkpoint-dir (a fresh start if there is none)",
    )
    s = p.add_argument_group(
        "secure aggregation",
        "With --secagg the coordinator learns only the sum of the workers' updates (Bonawitz "
        "et al. 2017). Workers need no flag.",
    )
    s.add_argument(
        "--secagg",
        action="store_true",
        help="aggregate updates with secure aggregation (masked, quantized deltas)",
    )
    s.add_argument(
        "--secagg-threshold",
        type=float,
        default=0.5,
        help="Shamir threshold t: a count >= 2, or a fraction f < 1 of each sharing group "
        "(t = floor(f*m)+1); a round survives while t workers remain (default: %(default)s)",
    )
    s.add_argument(
        "--secagg-neighbours",
        type=int,
        default=0,
        help="SecAgg+: share with this many neighbours of a random regular graph "
        "(about 2*log2(n) suffices); 0 = with every worker (default: %(default)s)",
    )
    s.add_argument(
        "--secagg-bits",
        type=int,
        default=16,
        help="signed fixed-point bits per coordinate (default: %(default)s)",
    )
    s.add_argument(
        "--secagg-clip",
        type=float,
        default=1.0,
        help="clipping range: every coordinate of a worker's delta (trained minus received "
        "weights) is clipped to [-CLIP, CLIP] (default: %(default)s)",
    )
    s.add_argument(
        "--secagg-phase-timeout",
        type=float,
        default=30.0,
        help="seconds the coordinator waits for each key, share and unmasking phase "
        "(default: %(default)s)",
    )
    s.add_argument(
        "--secagg-signed",
        action="store_true",
        help="the signed mode against an active coordinator, for training rounds and analytics "
        "queries alike: the workers sign their keys "
        "with their silo keys (fed-worker --signing-key --roster) and check each other's "
        "view of the round before unmasking (docs/secure-aggregation.md)",
    )
    s.add_argument(
        "--secagg-job",
        default="",
        help="signed mode: the job name every key is bound to, and that workers key their "
        "participation records by (default: none; each round's fresh id still binds them)",
    )
    add_dp_flags(p)
    add_plan_flags(p)
    add_analytics_flags(p)
    add_console_flags(p, what="the network's: workers, jobs, logs; scientists' own jobs")
    n = p.add_argument_group(
        "standing network (docs/network.md)",
        "With --serve the coordinator runs no federation of its own: it keeps serving, "
        "workers join once and stay, and data scientists submit jobs with fed-job. The "
        "federation flags above are then each job's to choose.",
    )
    n.add_argument(
        "--serve",
        action="store_true",
        help="run a standing network until stopped (needs --scientists and --state-dir)",
    )
    n.add_argument(
        "--state-dir",
        type=Path,
        help="the network's job store (jobs.db), jobs' checkpoints and models, audit log",
    )
    n.add_argument(
        "--max-running-jobs",
        type=int,
        default=NetworkSettings.max_running,
        help="jobs run at once (default: %(default)s)",
    )
    add_common_flags(p)
    return p


def _tls_from_args(args: argparse.Namespace) -> ServerTLS | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ConfigError("--tls-cert and --tls-key go together: give both")
    return ServerTLS(args.tls_cert, args.tls_key, args.tls_client_ca)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    try:
        params = json.loads(args.model_params)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-params is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise ConfigError("--model-params must be a JSON object")
    options = args.strategy_options
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--strategy-options is not valid JSON: {exc}") from None
    if not isinstance(options, dict):
        raise ConfigError("--strategy-options must be a JSON object")
    model = ModelSpec(args.model, params)
    shipped = plan_from_args(args, model, seed=args.seed, max_bytes=args.max_model_bytes * 2)
    return ServerConfig.from_flags(
        model=shipped[0] if shipped else model,
        plan=shipped[1] if shipped else None,
        listen=args.listen,
        rounds=args.rounds,
        min_workers=args.min_workers,
        min_results=args.min_results,
        round_timeout=args.round_timeout,
        round_retries=args.round_retries,
        approval_timeout=args.approval_timeout,
        approval_poll=args.approval_poll,
        join_timeout=args.join_timeout,
        strategy=args.strategy,
        strategy_options=options,
        train=TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            learning_rate=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            seed=args.seed,
        ),
        seed=args.seed,
        eval_data=args.eval_data,
        fed_eval_every=args.fed_eval_every,
        metrics_out=args.metrics_out,
        save_model=args.save_model,
        chunk_bytes=args.chunk_bytes,
        max_model_bytes=args.max_model_bytes,
        max_workers=args.max_workers,
        upload_slots=args.upload_slots,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
        upload_idle_timeout=args.upload_idle_timeout,
        handshake_timeout=args.handshake_timeout,
        max_pending_handshakes=args.max_pending_handshakes,
        max_pending_per_host=args.max_pending_per_host,
        handshake_rate=args.handshake_rate,
        handshake_burst=args.handshake_burst,
        max_streams_per_connection=args.max_streams_per_connection,
        max_connection_idle=args.max_connection_idle,
        max_connection_age=args.max_connection_age,
        upload_min_rate=args.upload_min_rate,
        max_examples=args.max_examples,
        enrollment_poll=args.enrollment_poll,
        threads=args.threads,
        device=args.device,
        require_tags=tuple(args.require_tag or ()),
        trainable=tuple(args.trainable or ()),
        tls=_tls_from_args(args),
        enrolled=args.enrolled,
        insecure=args.insecure,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        progress=args.progress,
        compression=args.compression,
        metrics_port=args.metrics_port,
        mlflow_uri=args.mlflow_uri,
        mlflow_experiment=args.mlflow_experiment,
        tensorboard_dir=args.tensorboard_dir,
        secagg=(
            SecAggParams(
                threshold=args.secagg_threshold,
                neighbours=args.secagg_neighbours,
                bits=args.secagg_bits,
                clip=args.secagg_clip,
                phase_timeout=args.secagg_phase_timeout,
                signed=args.secagg_signed,
                job=args.secagg_job,
            )
            if args.secagg
            else None
        ),
        dp=dp_settings_from_args(args),
        analytics=analytics_settings_from_args(args),
    )


class _Served(Protocol):
    """A coordinator or a standing network, as the command line runs it."""

    ready: asyncio.Event
    port: int | None

    def stop(self) -> None: ...

    async def run(self) -> object: ...


async def _run_announced(
    served: _Served, listen: str, on_ready: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Run ``served`` to its end (SIGINT and SIGTERM stop it) and, once it listens, print the
    line scripts and tests read the port from (the first one printed), then call ``on_ready``."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, served.stop)
    run = asyncio.create_task(served.run())
    ready = asyncio.create_task(served.ready.wait())
    await asyncio.wait({run, ready}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done():
        print(f"listening on {listen.rsplit(':', 1)[0]}:{served.port}", flush=True)
        if on_ready is not None:
            await on_ready()
    ready.cancel()
    await run


async def _serve(config: ServerConfig, console: ConsoleSettings | None = None) -> None:
    coordinator = Coordinator(config)
    stops: list[Callable[[], Awaitable[None]]] = []

    async def start_console() -> None:
        if console is not None:  # the web stack is imported only when asked for
            stops.append(await _start_console(console, coordinator))

    try:
        await _run_announced(coordinator, config.listen, start_console)
    finally:
        for stop in stops:
            await stop()


async def _start_console(
    settings: ConsoleSettings, coordinator: Coordinator
) -> Callable[[], Awaitable[None]]:
    """Serve the network console over ``coordinator``; the coroutine function that stops it."""
    from fedcore.console.logbuffer import RecentLogs

    from .console import start_network_console
    from .console_view import FederationView

    logs = RecentLogs()
    fedcore_log = logging.getLogger("fedcore")
    logs.attach(fedcore_log)
    model = str(coordinator.config.model)  # a shipped plan's is plan-<64 hex digits>
    name = f"{model if len(model) <= 32 else model[:29] + '...'} · {coordinator.config.strategy}"
    view = FederationView(name, coordinator.roster, logs, coordinator.reports.rows)
    coordinator.sinks.append(view)
    running = await start_network_console(settings, view, title=name)
    print(f"console on {running.url}", flush=True)

    async def stop() -> None:
        await running.stop()
        logs.detach(fedcore_log)

    return stop


async def _serve_network(
    config: ServerConfig, settings: NetworkSettings, console: ConsoleSettings | None = None
) -> None:
    network = Network(config, settings)
    stops: list[Callable[[], Awaitable[None]]] = []

    async def start_console() -> None:
        if console is not None:  # the web stack is imported only when asked for
            from .console_serve import start_standing_console

            stops.append(await start_standing_console(console, network))

    try:
        await _run_announced(network, config.listen, start_console)
    finally:
        for stop in stops:
            await stop()


def network_settings_from_args(args: argparse.Namespace) -> NetworkSettings | None:
    """The standing network's settings with --serve; None for a one-shot federation."""
    if not args.serve:
        if args.state_dir is not None:
            raise ConfigError("--state-dir is for a standing network: add --serve")
        return None
    if args.state_dir is None:
        raise ConfigError("--serve needs --state-dir (where jobs survive restarts)")
    return NetworkSettings(args.state_dir, args.max_running_jobs)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["audit"]:
        from fedcore.auditlog_cli import audit_main

        return audit_main("fed-server audit", args[1:])
    return run_cli("fed-server", lambda: _run(argv))


def _run(argv: Sequence[str] | None) -> None:
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    configure_logging(args, "fed-server")
    if args.console is not None and args.console_tls_cert is None and args.console_tls_key is None:
        # The console serves the coordinator's own certificate unless given another.
        args.console_tls_cert, args.console_tls_key = args.tls_cert, args.tls_key
    console = console_settings_from_args(args)  # before the model is built: fails fast
    config = config_from_args(args)
    network = network_settings_from_args(args)
    return_freed_memory(max_message_bytes(config.limits.chunk_bytes))
    if network is not None:
        asyncio.run(_serve_network(config, network, console))
    else:
        asyncio.run(_serve(config, console))


if __name__ == "__main__":
    sys.exit(main())
