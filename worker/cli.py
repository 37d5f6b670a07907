"""``fed-worker``: join a federation with a local data shard."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedcore.auditlog import AuditLog
from fedcore.cli_support import add_common_flags, configure_logging, parse_args_with_config, run_cli
from fedcore.console import ConsoleSettings, add_console_flags, console_settings_from_args
from fedcore.data import load_shard
from fedcore.data.metadata import DatasetMetadata, load_metadata, metadata_path_for
from fedcore.data.table import is_table_path, load_table, mock_csv
from fedcore.errors import ConfigError
from fedcore.heap import return_freed_memory
from fedcore.plan import ModelSpec
from fedcore.policy import Policy, RecordDPSetup, load_policy
from fedcore.privacy.dpsgd import DPSGD
from fedcore.protocol import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MODEL_BYTES, max_message_bytes
from fedcore.secagg.identity import Roster, SiloIdentity, load_signing_key
from fedcore.secagg.participation import ParticipationLog
from fedcore.tls import ClientTLS, host_of, require_tls_or_loopback

from .analytics import EXACT_ENV, QueryResponder, TableOnlyTrainer
from .console_view import OwnerView
from .frozen import FrozenStore
from .owner_commands import owner_command
from .plans import PlanLibrary
from .policy import PolicyGuard
from .runtime import ChannelFactory, Worker, insecure_channel, tls_channel_factory
from .trainer import TorchTrainer, Trainer

if TYPE_CHECKING:
    from fedcore.console.serve import RunningConsole

__all__ = ["build_parser", "main"]

log = logging.getLogger("fedcore.worker")

_TOKEN_ENV = "FEDCORE_TOKEN"

_DESCRIPTION = """\
Join a fedcore federation. The worker connects to the coordinator (retrying with backoff
until it is up), trains the model each round's plan names on the local shard -- the data never
leaves this machine, only model updates do -- and exits 0 when the coordinator says the
federation is over.
"""

_EPILOG = """\
examples:
  fed-worker --server 127.0.0.1:50051 --data shards/shard-0.npz --name hospital-a
  fed-worker --server coord:50051 --data /data/mnist-idx --name lab-b --model mnist-cnn --device cuda
  fed-worker --server coord:50051 --data shards/shard-0.npz --policy policy.toml

Every plan passes the worker's gate before anything runs: only registered models or the
one --model configured here are built, sized first; training, DP and secure-aggregation
parameters are bounded; safe defaults apply without a policy (docs/threat-model.md).
The data owner's policy (--policy, a TOML file) says which plans this worker accepts: models,
local epochs, secure aggregation, differential privacy, and the silo's privacy budget, kept in
a ledger on this machine. A plan that breaks it is refused, with the reason sent to the
coordinator and logged here. A shard's metadata file (shard-0.meta.toml beside shard-0.npz,
or --metadata) is advertised to the coordinator: name, tags, license, features.

Models shipped as plans (fed-server --ship-plan) run without --model, after verification
against an allow-list of operations; with [plans] require-approval in the policy, only once
the data owner approved them: fed-worker requests --policy policy.toml list|show|approve|deny.
The privacy spent, in epsilon: fed-worker ledger --policy policy.toml.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fed-worker",
        # A mistyped flag then shows one usage line above the error, not forty; --help
        # lists every option.
        usage="%(prog)s [options]",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--server", required=False, help="the coordinator's HOST:PORT (required)")
    p.add_argument(
        "--data",
        type=Path,
        help="local training shard: .npz with arrays x, y, or an MNIST IDX directory; or a "
        ".csv/.parquet table answering federated-analytics queries (required)",
    )
    p.add_argument("--name", default=None, help="this worker's unique name (default: HOSTNAME-PID)")
    p.add_argument(
        "--eval-data",
        type=Path,
        help="local test set for federated evaluation (default: the training shard)",
    )
    p.add_argument(
        "--model",
        help="accept only this model: a registered name, or your own pkg.module:factory "
        "(plans may name no other import path; checked when joining and on every task)",
    )
    p.add_argument(
        "--model-params",
        default="{}",
        metavar="JSON",
        help="hyper-parameters of --model as a JSON object; plans must use exactly these",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--max-model-bytes",
        type=int,
        default=DEFAULT_MAX_MODEL_BYTES,
        help="largest model accepted (default: %(default)s)",
    )
    p.add_argument(
        "--give-up-after",
        type=float,
        default=900.0,
        help="exit after this many seconds without reaching the coordinator; 0 = never (default: %(default)s)",
    )
    g = p.add_argument_group("data owner's controls")
    g.add_argument(
        "--policy",
        type=Path,
        metavar="POLICY.toml",
        help="refuse plans that break this policy (see the README's page for data owners)",
    )
    g.add_argument(
        "--metadata",
        type=Path,
        metavar="META.toml",
        help="the dataset's public description to advertise (default: the shard's "
        "NAME.meta.toml, or metadata.toml in an IDX directory, when present)",
    )
    g.add_argument(
        "--frozen-cache",
        type=Path,
        metavar="DIR",
        help="keep the frozen parameters of plans here, by content hash, so that they are "
        "downloaded once, even across restarts (default: in memory only)",
    )
    g.add_argument(
        "--frozen-weights",
        type=Path,
        metavar="FILE.safetensors",
        help="use these frozen parameters (for example the base model of LoRA fine-tuning) "
        "and refuse plans whose frozen parameters differ from them; they are never downloaded",
    )
    s = p.add_argument_group("security (see fed-certs --help)")
    s.add_argument("--tls-ca", type=Path, help="CA that signed the coordinator's certificate")
    s.add_argument("--tls-cert", type=Path, help="mutual TLS: this worker's certificate (PEM)")
    s.add_argument("--tls-key", type=Path, help="mutual TLS: the private key of --tls-cert")
    s.add_argument(
        "--tls-server-name",
        help="name to expect in the coordinator's certificate when it differs from --server",
    )
    s.add_argument(
        "--token-file",
        type=Path,
        help=f"file holding this worker's enrollment token (or set {_TOKEN_ENV})",
    )
    s.add_argument(
        "--signing-key",
        type=Path,
        help="signed secure aggregation: this silo's Ed25519 key (fed-certs writes "
        "workers/NAME.signing.pem); needs --roster; overrides the policy's [secure-aggregation] "
        "signing-key",
    )
    s.add_argument(
        "--audit-log",
        type=Path,
        metavar="FILE",
        help="append every task this worker ran or refused, and every job's end, to this "
        "hash-chained audit log (check it with `fed-worker audit verify FILE`)",
    )
    s.add_argument(
        "--roster",
        type=Path,
        help="signed secure aggregation: the silos (names and signing-key fingerprints) this "
        "worker accepts as peers, agreed by the data owners (fed-certs writes roster.json); "
        "rounds naming any other silo, or keys they did not sign, are refused; overrides the "
        "policy's [secure-aggregation] roster or peers",
    )
    s.add_argument(
        "--secagg-participation",
        type=Path,
        metavar="FILE",
        help="secure aggregation: record every masked contribution here (kept across "
        "restarts) and refuse a second one per signed round or over a nearly unchanged "
        "model (default with --signing-key: KEY.participation.json beside it)",
    )
    s.add_argument(
        "--secagg-min-model-distance",
        type=float,
        default=1e-4,
        help="refuse a masked update over a model within this relative L2 distance of one "
        "already contributed over (default: %(default)s)",
    )
    s.add_argument(
        "--secagg-repeat-with-dp",
        action="store_true",
        help="allow such a repeat when the round adds distributed DP noise (each repeat is "
        "then a fresh noisy release the accountant charges)",
    )
    s.add_argument(
        "--insecure",
        action="store_true",
        help="allow a plaintext connection to another machine (default: refused)",
    )
    d = p.add_argument_group(
        "record-level differential privacy (DP-SGD through Opacus; protects each local record)"
    )
    d.add_argument(
        "--dpsgd-noise-multiplier",
        type=float,
        help="train with DP-SGD: per-example gradient noise std / clip norm (off by default)",
    )
    d.add_argument(
        "--dpsgd-clip",
        type=float,
        default=1.0,
        help="per-example gradient L2 clip norm (default: %(default)s)",
    )
    d.add_argument(
        "--dpsgd-delta",
        type=float,
        default=1e-5,
        help="delta at which this silo reports its epsilon; keep it below 1/records (default: %(default)s)",
    )
    d.add_argument(
        "--dpsgd-max-epsilon",
        type=float,
        help="this silo's budget: refuse any round that would take its epsilon past it",
    )
    d.add_argument(
        "--dpsgd-state",
        type=Path,
        metavar="FILE",
        help="where DP-SGD's accountant is kept across restarts (default with "
        "--dpsgd-max-epsilon: DATA.dpsgd-state.json beside --data)",
    )
    add_console_flags(p, what="the data owner's: review plan requests, the ledger, the audit log")
    add_common_flags(p)
    return p


def _dataset_metadata(args: argparse.Namespace, num_examples: int) -> DatasetMetadata | None:
    path = args.metadata if args.metadata is not None else metadata_path_for(args.data)
    if args.metadata is None and not path.is_file():
        return None
    return load_metadata(path, num_examples=num_examples)


def _table_worker(
    args: argparse.Namespace,
    identity: SiloIdentity | None,
    participation: ParticipationLog | None,
) -> tuple[Trainer, QueryResponder, DatasetMetadata]:
    """A worker serving a CSV or Parquet table for analytics queries (it trains nothing)."""
    path = args.metadata if args.metadata is not None else metadata_path_for(args.data)
    if not path.is_file():
        raise ConfigError(
            f"the table {args.data} needs a metadata file ({path}, or --metadata) declaring "
            "its columns with their public bounds or categories"
        )
    declared = load_metadata(path)
    table = load_table(args.data, declared.features)
    dataset = load_metadata(path, num_examples=table.num_rows)
    if dataset.mock is not None:
        dataset = dataset.with_mock_csv(mock_csv(dataset.mock, dataset.features))
    exact = os.environ.get(EXACT_ENV) == "1"
    responder = QueryResponder(
        table, dataset, exact=exact, identity=identity, participation=participation
    )
    return TableOnlyTrainer(table), responder, dataset


def _coordinator_identity(args: argparse.Namespace) -> str | None:
    """The name the coordinator's TLS certificate is verified against (None without TLS)."""
    if args.tls_ca is None:
        return None
    return str(args.tls_server_name or host_of(args.server))


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is None:
        env: str | None = os.environ.get(_TOKEN_ENV)
        return env or None
    try:
        token: str = Path(args.token_file).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read --token-file {args.token_file}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"--token-file {args.token_file} is empty")
    return token


def _client_tls(args: argparse.Namespace) -> ClientTLS | None:
    if args.tls_ca is None:
        if args.tls_cert or args.tls_key:
            raise ConfigError("--tls-cert/--tls-key need --tls-ca (the coordinator's CA)")
        require_tls_or_loopback(args.server, tls=False, insecure=args.insecure, role="worker")
        return None
    return ClientTLS(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)


def _channel_factory(tls: ClientTLS | None) -> ChannelFactory:
    return insecure_channel if tls is None else tls_channel_factory(tls)


async def _serve(worker: Worker, console: tuple[ConsoleSettings, OwnerView] | None = None) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    running = await _start_console(*console) if console is not None else None
    try:
        await worker.run()
    except asyncio.CancelledError:
        log.info("stopped by signal")
    finally:
        if running is not None:
            await running.stop()


async def _start_console(settings: ConsoleSettings, view: OwnerView) -> RunningConsole:
    from .console import start_owner_console  # the web stack is imported only when asked for

    running = await start_owner_console(settings, view)
    # Scripts and tests read the address from this line.
    print(f"console on {running.url}", flush=True)
    return running


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    code = owner_command(args)  # the data owner's plan request queue and ledger
    if code is not None:
        return code
    return run_cli("fed-worker", lambda: _run(args))


def _run(argv: Sequence[str] | None) -> None:
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    configure_logging(args, "fed-worker")
    # As the coordinator: chunk messages from the heap, freed memory handed back.
    return_freed_memory(max_message_bytes(DEFAULT_CHUNK_BYTES))
    if not args.server or not args.data:
        raise ConfigError("--server and --data are required (see fed-worker --help)")
    tls = _client_tls(args)
    console = console_settings_from_args(args)  # a bad console setting fails before any work
    channel_factory = _channel_factory(tls)
    token = _token(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        params = json.loads(args.model_params)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-params is not valid JSON: {exc}") from None
    extra: dict[str, Any] = {}
    policy = load_policy(args.policy) if args.policy is not None else Policy()
    if args.dpsgd_noise_multiplier is not None:
        state = args.dpsgd_state
        if state is None and args.dpsgd_max_epsilon is not None:
            # The budget must survive restarts, or a restart would reset it.
            data = Path(args.data).resolve()
            state = data.with_name(data.name + ".dpsgd-state.json")
        if state is not None:
            log.info("DP-SGD accountant kept in %s", state)
        extra["train_fn"] = DPSGD(
            noise_multiplier=args.dpsgd_noise_multiplier,
            max_grad_norm=args.dpsgd_clip,
            delta=args.dpsgd_delta,
            max_epsilon=args.dpsgd_max_epsilon,
            state_file=state,
            secure_mode=policy.privacy.dpsgd_secure_mode,
        )
    elif args.dpsgd_max_epsilon is not None:
        raise ConfigError("--dpsgd-max-epsilon needs --dpsgd-noise-multiplier")
    plans = PlanLibrary(
        policy.plans,
        max_model_bytes=args.max_model_bytes,
        dpsgd=args.dpsgd_noise_multiplier is not None,
        coordinator=args.server,
    )
    responder: QueryResponder | None = None
    trainer: Trainer | None = None
    shard = None
    dataset: DatasetMetadata | None
    name = args.name or f"{socket.gethostname()}-{os.getpid()}"
    identity = _silo_identity(args, name, policy)
    participation = _participation(args, policy)
    if is_table_path(args.data):
        trainer, responder, dataset = _table_worker(args, identity, participation)
        num_examples = trainer.num_examples
        labels = None
    else:
        shard = load_shard(args.data)
        num_examples = len(shard)
        labels = shard.y.numpy()
        dataset = _dataset_metadata(args, num_examples)
    guard = None
    if args.policy is not None:
        # Before the trainer: a coordinator the policy does not allow stops the worker before
        # anything is built, warmed up or sent.
        guard = PolicyGuard(
            policy,
            num_examples=num_examples,
            record_dp=(
                RecordDPSetup(args.dpsgd_noise_multiplier, args.dpsgd_clip)
                if args.dpsgd_noise_multiplier is not None
                else None
            ),
            coordinator_identity=_coordinator_identity(args),
        )
        log.info("policy %s: %s", args.policy, "; ".join(guard.policy.describe()))
        if dataset is not None and labels is not None:
            dataset = dataset.with_histogram(guard.label_histogram(labels))
    if shard is not None:
        trainer = TorchTrainer(
            shard,
            eval_data=load_shard(args.eval_data) if args.eval_data else None,
            model=ModelSpec(args.model, params) if args.model else None,
            device=args.device,
            plans=plans,
            **extra,
        )
    assert trainer is not None  # a table worker or a shard worker
    if dataset is not None:
        log.info("advertising dataset %s", dataset.summary())
    worker = Worker(
        args.server,
        name,
        trainer,
        max_model_bytes=args.max_model_bytes,
        give_up_after=args.give_up_after or None,
        guard=guard,
        plans=plans,
        dataset=dataset,
        channel_factory=channel_factory,
        token=token,
        tls=tls,
        analytics=responder,
        frozen=FrozenStore(args.frozen_cache, args.frozen_weights),
        identity=identity,
        participation=participation,
        audit=AuditLog(args.audit_log) if args.audit_log is not None else None,
    )
    owner = None
    if console is not None:
        # One queue holds plans' and (under [jobs] approval = "always") jobs' requests.
        jobs = worker.gate.jobs
        queue = plans.queue or (jobs.queue if jobs is not None else None)
        view = OwnerView(
            queue=queue, policy=policy, worker=worker, dataset=dataset, audit_log=args.audit_log
        )
        owner = (console, view)
    asyncio.run(_serve(worker, owner))


def _signing_key_path(args: argparse.Namespace, policy: Policy) -> Path | None:
    """``--signing-key``, else the policy's ``[secure-aggregation] signing-key``."""
    key: Path | None = args.signing_key
    return key if key is not None else policy.privacy.signing.signing_key


def _participation(args: argparse.Namespace, policy: Policy) -> ParticipationLog | None:
    """The on-disk record of masked contributions, when asked for (or signed mode is on),
    keyed by the policy's budget study."""
    path: Path | None = args.secagg_participation
    key = _signing_key_path(args, policy)
    if path is None and key is not None:
        path = key.with_name(key.name + ".participation.json")
    if path is None:
        return None
    log.info("secure aggregation: masked contributions recorded in %s", path)
    return ParticipationLog(
        path,
        study=policy.budget.study if policy.budget is not None else "",
        min_distance=args.secagg_min_model_distance,
        allow_with_dp=args.secagg_repeat_with_dp,
    )


def _roster(args: argparse.Namespace, policy: Policy) -> tuple[Roster, str] | None:
    """``--roster``, else the policy's ``roster`` file or pinned ``peers``, and its source."""
    signing = policy.privacy.signing
    if args.roster is not None:
        return Roster.load(args.roster), str(args.roster)
    if signing.roster is not None:
        return Roster.load(signing.roster), str(signing.roster)
    if signing.peers is not None:
        where = f"{policy.source} [secure-aggregation.peers]"
        return Roster.from_fingerprints(dict(signing.peers), where), where
    return None


def _silo_identity(args: argparse.Namespace, name: str, policy: Policy) -> SiloIdentity | None:
    """This silo's signing key and roster (signed secure aggregation), from the flags or
    the policy's ``[secure-aggregation]`` (the flags override it)."""
    key = _signing_key_path(args, policy)
    roster = _roster(args, policy)
    if (key is None) != (roster is None):
        raise ConfigError(
            "a signing key and the peers it accepts go together: give --signing-key and "
            "--roster, or signing-key with roster or peers in the policy's [secure-aggregation]"
        )
    if key is None or roster is None:
        return None
    identity = SiloIdentity(name, load_signing_key(key), roster[0])
    log.info(
        "signed secure aggregation: %d silo(s) in the roster %s",
        len(identity.roster.fingerprints),
        roster[1],
    )
    return identity


if __name__ == "__main__":
    sys.exit(main())
