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

from fedcore.cli_support import add_common_flags, configure_logging, parse_args_with_config, run_cli
from fedcore.console import ConsoleSettings, add_console_flags, console_settings_from_args
from fedcore.errors import ConfigError
from fedcore.flags import add_flags, flag_fields, flag_name, flag_values
from fedcore.heap import return_freed_memory
from fedcore.models import available_models
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.protocol import max_message_bytes
from fedcore.secagg import SecAggParams
from fedcore.strategy import describe_strategies
from fedcore.tls import ServerTLS

from .coordinator import Coordinator
from .network import Network, NetworkSettings
from .plans import add_plan_flags, plan_from_args
from .state.analytics import add_analytics_flags, analytics_settings_from_args
from .state.config import Limits, Output, Recovery, Security, ServerConfig
from .state.privacy import add_dp_flags, dp_settings_from_args

__all__ = ["build_parser", "main"]

log = logging.getLogger("fedcore.server")

_DEFAULTS = ServerConfig()
#: The "timeouts and limits" group; Limits' other flags are the limits against hostile workers.
_LIMITS = (
    "round_timeout",
    "round_retries",
    "approval_timeout",
    "join_timeout",
    "heartbeat_interval",
    "heartbeat_timeout",
    "upload_idle_timeout",
    "handshake_timeout",
    "chunk_bytes",
    "max_model_bytes",
    "max_workers",
    "upload_slots",
)
#: The local training flags, by TrainConfig field (its seed is --seed).
TRAIN_FLAGS = {f.name: flag_name(f) for f in flag_fields(TrainConfig)}

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
    add_flags(g, ServerConfig, only=("listen",))
    g.add_argument(
        "--model",
        default=_DEFAULTS.model.name,
        help=f"model to train: {', '.join(available_models())}, or package.module:factory "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--model-params",
        default="{}",
        metavar="JSON",
        help="model hyper-parameters as a JSON object, e.g. '{\"hidden\": 100}'",
    )
    add_flags(g, ServerConfig, only=("rounds", "min_workers", "min_results", "strategy"))
    g.add_argument(
        "--strategy-options",
        default="{}",
        metavar="JSON",
        help="the strategy's options as a JSON object, e.g. '{\"server-lr\": 0.1}' "
        "(or a [strategy] table in --config)",
    )
    add_flags(g, ServerConfig, only=("seed", "require_tags", "trainable"))
    t = p.add_argument_group("local training (sent to workers in every plan)")
    add_flags(t, TrainConfig)
    add_flags(t, ServerConfig, only=("compression",))
    add_flags(p.add_argument_group("evaluation and output"), Output)
    add_flags(p.add_argument_group("timeouts and limits"), Limits, only=_LIMITS)
    add_flags(
        p.add_argument_group("limits against hostile workers (see docs/coordinator-hardening.md)"),
        Limits,
        only=[f.name for f in flag_fields(Limits) if f.name not in _LIMITS],
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
    add_flags(s, Security)
    add_flags(p.add_argument_group("crash recovery"), Recovery)
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
    add_flags(s, SecAggParams)
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
    add_flags(n, NetworkSettings)
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
    return ServerConfig(
        **flag_values(ServerConfig, args),
        model=shipped[0] if shipped else model,
        plan=shipped[1] if shipped else None,
        strategy_options=options,
        train=TrainConfig(**flag_values(TrainConfig, args), seed=args.seed),
        secagg=SecAggParams(**flag_values(SecAggParams, args)) if args.secagg else None,
        dp=dp_settings_from_args(args),
        analytics=analytics_settings_from_args(args),
        limits=Limits(**flag_values(Limits, args)),
        output=Output(**flag_values(Output, args)),
        security=Security(tls=_tls_from_args(args), **flag_values(Security, args)),
        recovery=Recovery(**flag_values(Recovery, args)),
    )


async def _serve(
    config: ServerConfig,
    network: NetworkSettings | None = None,
    console: ConsoleSettings | None = None,
) -> None:
    """Run a one-shot federation (``network`` None) or a standing network until it ends or a
    signal stops it."""
    coordinator: Coordinator | None = None
    if network is None:
        coordinator = Coordinator(config)  # one job on a network of its own
        served = coordinator.network
    else:
        served = Network(config, network)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, served.stop)
    stops: list[Callable[[], Awaitable[None]]] = []
    try:
        run = asyncio.create_task(coordinator.run() if coordinator is not None else served.run())
        ready = asyncio.create_task(served.ready.wait())
        await asyncio.wait({run, ready}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            # Scripts and tests read the port from this line (the first one printed).
            host = config.listen.rsplit(":", 1)[0]
            print(f"listening on {host}:{served.port}", flush=True)
            if console is not None:  # the web stack is imported only when asked for
                if coordinator is not None:
                    stops.append(await _start_console(console, coordinator))
                else:
                    from .console_serve import start_standing_console

                    # Its pages read the job store: it stops before the network closes it.
                    served.on_close.append(await start_standing_console(console, served))
        ready.cancel()
        await run
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


def network_settings_from_args(args: argparse.Namespace) -> NetworkSettings | None:
    """The standing network's settings with --serve; None for a one-shot federation."""
    if not args.serve:
        if args.state_dir is not None:
            raise ConfigError("--state-dir is for a standing network: add --serve")
        return None
    if args.state_dir is None:
        raise ConfigError("--serve needs --state-dir (where jobs survive restarts)")
    return NetworkSettings(**flag_values(NetworkSettings, args))


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
    asyncio.run(_serve(config, network, console))


if __name__ == "__main__":
    sys.exit(main())
