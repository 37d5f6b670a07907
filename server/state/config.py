"""The coordinator's settings, as dataclasses shared by the CLI and the Python API."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedcore.compression import SCHEMES
from fedcore.data.metadata import normalize_tag
from fedcore.errors import ConfigError
from fedcore.flags import setting
from fedcore.flow_control import DEFAULT_STREAM_WINDOW, MAX_STREAM_WINDOW
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.protocol import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MODEL_BYTES
from fedcore.secagg.params import SecAggParams
from fedcore.tls import ServerTLS, require_tls_or_loopback
from fedcore.v1 import fedcore_pb2 as pb

from .analytics import AnalyticsSettings
from .limits import GateLimits, require_authentication_off_loopback
from .privacy import DPSettings

__all__ = ["Limits", "Output", "Recovery", "Security", "ServerConfig", "split_listen"]


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` too) as host and port; a missing or bad port is an error
    (gRPC would silently use 443)."""
    host, sep, port = listen.rpartition(":")
    if not sep or host.endswith(":") or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"--listen {listen!r} needs HOST:PORT, e.g. 127.0.0.1:50051 (port 0 picks a free one)"
        )
    return host.removeprefix("[").removesuffix("]"), int(port)


@dataclass
class Limits:
    """Timeouts and limits (``fed-server --help``, "timeouts and limits")."""

    round_timeout: float = setting(600.0, "seconds a round waits for results")
    round_retries: int = setting(3, "retries of a round with too few results")
    approval_timeout: float = setting(
        3600.0,
        "seconds a round waits for a worker whose data owner has not yet approved the plan "
        "(its other results are kept; 0: do not wait)",
    )
    approval_poll: float = setting(
        30.0,
        "most seconds between two asks of a worker awaiting its owner's approval (the first "
        "after 2 s, then doubling): how late a round learns of an owner's decision",
    )
    join_timeout: float | None = setting(
        None, "seconds to wait for --min-workers before round 1 (default: forever)"
    )
    heartbeat_interval: float = setting(5.0, "seconds between worker heartbeats")
    heartbeat_timeout: float = setting(60.0, "drop a worker silent this long")
    upload_idle_timeout: float = setting(
        30.0,
        "drop a worker whose upload holds an upload slot this long without sending a chunk, so "
        "one stalled connection cannot block the others",
    )
    handshake_timeout: float = setting(10.0, "seconds a new stream has to send its hello")
    shutdown_grace: float = 5.0
    chunk_bytes: int = setting(DEFAULT_CHUNK_BYTES, "payload chunk size; bounds every gRPC message")
    max_model_bytes: int = setting(DEFAULT_MAX_MODEL_BYTES, "largest model or update accepted")
    max_workers: int = setting(1000, "most workers connected at once")
    upload_slots: int = setting(
        1,
        "updates staged whole in memory at once besides the running sum; uploads to a "
        "streaming strategy (the FedAvg family) take no slot: they are folded into the sum "
        "chunk by chunk, all at once; nor do FedBuff's (spooled to disk until folded)",
    )
    stream_window: int = setting(
        DEFAULT_STREAM_WINDOW,
        "HTTP/2 window of each worker stream, in bytes: how far a worker may send ahead of "
        "what the coordinator has read (0: gRPC's own 64 KiB); raise it to the "
        "bandwidth-delay product of a long fat link (e.g. 33554432 for 1 Gbit/s x 200 ms) at "
        "the cost of up to workers x this many unread bytes in memory",
        metavar="BYTES",
    )
    # Limits against hostile workers (see docs/coordinator-hardening.md).
    max_pending_handshakes: int = setting(
        128, "streams open at once that have not sent their hello yet; more are refused"
    )
    max_pending_per_host: int = setting(32, "the same, per peer host")
    #: New streams per second one host may open (token bucket; 0: unlimited), and its burst.
    handshake_rate: float = setting(
        20.0,
        "new streams per second one host may open on average; 0 = unlimited",
        metavar="PER_S",
    )
    handshake_burst: int = setting(
        100, "new streams one host may open at once after a quiet period"
    )
    max_streams_per_connection: int = setting(8, "HTTP/2 streams one connection may have open")
    max_connection_idle: float = setting(
        300.0, "close a connection without any RPC for this long; 0 = never", metavar="SECONDS"
    )
    max_connection_age: float = setting(
        3600.0,
        "after this long a connection may open no new stream (its open streams go on); 0 = never",
        metavar="SECONDS",
    )
    upload_min_rate: float = setting(
        16384.0,
        "an upload that holds an upload slot longer than --upload-idle-timeout must average at "
        "least this rate, or its worker is dropped; 0 = no minimum",
        metavar="BYTES_PER_S",
    )
    max_examples: int = setting(
        10_000_000,
        "most examples one worker may claim: a hello above it is clamped, and a result "
        "claiming more than its hello (or this) is clamped, logged, and still aggregated",
    )
    enrollment_poll: float = setting(
        1.0,
        "how often the --enrolled file is re-read; a revoked or removed worker is "
        "disconnected at the next check",
        metavar="SECONDS",
    )

    def __post_init__(self) -> None:
        if self.round_timeout <= 0:
            raise ConfigError("--round-timeout must be positive")
        if self.round_retries < 0:
            raise ConfigError("--round-retries cannot be negative")
        if self.approval_timeout < 0:
            raise ConfigError("--approval-timeout cannot be negative (0: do not wait)")
        if self.approval_poll <= 0:
            raise ConfigError("--approval-poll must be positive")
        if not 1024 <= self.chunk_bytes <= 64 * 1024 * 1024:
            raise ConfigError("--chunk-bytes must be between 1 KiB and 64 MiB")
        if not 0 <= self.stream_window <= MAX_STREAM_WINDOW:
            raise ConfigError(f"--stream-window must be between 0 and {MAX_STREAM_WINDOW}")
        if self.upload_slots < 1:
            raise ConfigError("--upload-slots must be at least 1")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError("--heartbeat-timeout must be longer than the heartbeat interval")
        if self.handshake_timeout <= 0:
            raise ConfigError("--handshake-timeout must be positive")
        if self.max_model_bytes < 1:
            raise ConfigError("--max-model-bytes must be positive")
        if self.max_streams_per_connection < 1:
            raise ConfigError("--max-streams-per-connection must be at least 1")
        if self.max_connection_idle < 0 or self.max_connection_age < 0:
            raise ConfigError("--max-connection-idle/--max-connection-age cannot be negative")
        if self.upload_min_rate < 0:
            raise ConfigError("--upload-min-rate cannot be negative (0 turns it off)")
        if self.max_examples < 1:
            raise ConfigError("--max-examples must be at least 1")
        if self.enrollment_poll <= 0:
            raise ConfigError("--enrollment-poll must be positive")
        self.gate_limits  # noqa: B018 -- validates the handshake limits now

    @property
    def gate_limits(self) -> GateLimits:
        """The handshake gate's limits (``--max-pending-*``, ``--handshake-*``)."""
        return GateLimits(
            max_pending=self.max_pending_handshakes,
            max_pending_per_host=self.max_pending_per_host,
            rate_per_host=self.handshake_rate,
            burst_per_host=self.handshake_burst,
        )


@dataclass
class Output:
    """Evaluation and what the coordinator writes (``fed-server --help``, "evaluation and
    output"): metrics, the model, progress and the experiment trackers."""

    eval_data: Path | None = setting(
        None, "test set for centralized evaluation (.npz with x, y, or an IDX directory)"
    )
    # Small batches keep activations in cache: 10k MNIST test images evaluate in 2.8 s at 128
    # against 4.5 s at 1000 on one thread (mnist-cnn).
    eval_batch_size: int = 128
    #: None at construction picks the default: every round without ``eval_data``, else never.
    fed_eval_every: int | None = setting(
        None,
        "federated evaluation on the workers every N rounds (0 = never; default: every round "
        "without --eval-data, else never)",
    )
    metrics_out: Path | None = setting(None, "write one JSON object per round to this file")
    save_model: Path | None = setting(None, "write the final global weights here (safetensors)")
    progress: str = setting(
        "auto",
        "live: a progress panel redrawn in place and a summary table at the end; plain: a "
        "table row per round and a 'summary key=value ...' line, for scripts; auto: live when "
        "stdout is a terminal",
        choices=("auto", "live", "plain"),
    )
    metrics_port: int | None = setting(
        None,
        "serve Prometheus metrics on http://LISTEN-HOST:PORT/metrics (rounds, workers, bytes, "
        "round durations, accuracy, epsilon); 0 picks a free port (default: off)",
        metavar="PORT",
    )
    # Experiment trackers (server/reporting/mlflow.py, tensorboard.py).
    mlflow_uri: str | None = setting(
        None,
        "log the settings and every round's metrics to an MLflow tracking store, e.g. "
        "sqlite:///mlflow.db or http://host:5000 (needs fedcore[tracking])",
        metavar="URI",
    )
    mlflow_experiment: str = setting("fedcore", "the MLflow experiment of the run", metavar="NAME")
    tensorboard_dir: Path | None = setting(
        None,
        "write every round's metrics as TensorBoard event files here (tensorboard --logdir "
        "DIR; needs fedcore[tracking])",
        metavar="DIR",
    )
    threads: int | None = setting(None, "torch threads for centralized evaluation")
    device: str = setting("cpu", "device for centralized evaluation")

    def __post_init__(self) -> None:
        if self.fed_eval_every is None:
            self.fed_eval_every = 0 if self.eval_data is not None else 1
        if self.fed_eval_every < 0:
            raise ConfigError(f"--fed-eval-every cannot be negative, got {self.fed_eval_every}")
        if self.progress not in ("auto", "live", "plain"):
            raise ConfigError(f"--progress must be auto, live or plain, got {self.progress!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(
                f"--metrics-port must be a TCP port (0-65535; 0 picks a free one), "
                f"got {self.metrics_port}"
            )


@dataclass
class Security:
    """Transport security and authentication (see fedcore.tls, fedcore.enrollment)."""

    #: From ``--tls-cert``, ``--tls-key`` and ``--tls-client-ca`` (server/cli.py).
    tls: ServerTLS | None = None
    enrolled: Path | None = setting(
        None,
        "enrolled workers (JSON written by fed-certs): only they may join, proving their name "
        "with a token and/or their mTLS certificate; re-read when it changes",
    )
    insecure: bool = setting(
        False,
        "allow plaintext, or no worker authentication, on an address other machines can "
        "reach (default: refused)",
    )


@dataclass
class Recovery:
    """Crash recovery (see server/state/checkpoint.py)."""

    checkpoint_dir: Path | None = setting(
        None,
        "write the global model, strategy state, round number and metrics here atomically "
        "after every round",
    )
    resume: bool = setting(
        False,
        "continue from the checkpoint in --checkpoint-dir (a fresh start if there is none)",
    )

    def __post_init__(self) -> None:
        if self.resume and self.checkpoint_dir is None:
            raise ConfigError("--resume needs --checkpoint-dir (where the checkpoint is)")


_GROUPS: dict[str, type[Limits | Output | Security | Recovery]] = {
    "limits": Limits,
    "output": Output,
    "security": Security,
    "recovery": Recovery,
}


@dataclass
class ServerConfig:
    """Everything ``fed-server`` can be told; see ``fed-server --help`` for each field.

    The federation's own settings are fields; timeouts and limits, evaluation and output,
    security and crash recovery are groups (:class:`Limits`, :class:`Output`,
    :class:`Security`, :class:`Recovery`). :meth:`from_flags` takes them all as flat keywords
    named like the flags.
    """

    model: ModelSpec = field(default_factory=lambda: ModelSpec("mnist-cnn"))
    # A model shipped as a program (server/plans.py): sent with every task; model names it.
    plan: pb.PlanProgram | None = None
    listen: str = setting(
        "127.0.0.1:50051",
        "address to serve on, port included (0 picks a free one); a port another process "
        "holds is refused",
        metavar="HOST:PORT",
    )
    rounds: int = setting(3, "training rounds")
    min_workers: int = setting(2, "workers that must be connected before round 1")
    min_results: int | None = setting(
        None,
        "valid results a round needs to count; later rounds start once this many workers are "
        "ready (default: --min-workers)",
    )
    strategy: str = setting(
        "fedavg",
        "aggregation strategy: a built-in name (listed below) or package.module:Class",
        metavar="NAME",
    )
    strategy_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = setting(0, "seed of the initial model and of local shuffling")
    #: Only workers whose dataset carries all these tags are selected (``--require-tag``).
    require_tags: tuple[str, ...] = setting(
        (),
        "select only workers whose dataset metadata carries this tag (e.g. mnist or '#mnist'); "
        "repeat for several; others stay connected and listed but never train",
        flag="--require-tag",
        metavar="TAG",
    )
    # Trainable parameter patterns (see fedcore.frozen); empty: the whole model trains.
    trainable: tuple[str, ...] = setting(
        (),
        "train only the parameters whose names match this pattern (fnmatch, e.g. 'net.3.*'; "
        "repeat for several), or @requires-grad: those the model factory leaves trainable "
        "(LoRA adapters from peft); the rest is frozen and sent to each worker once "
        "(default: the whole model trains)",
        metavar="PATTERN",
    )
    # Workers send their deltas as float16 or int8 (with error feedback); see fedcore.compression.
    compression: str = setting(
        "none",
        "workers send their update as a float16 delta (2x fewer bytes) or an int8 delta with "
        "one scale per tensor (about 4x fewer), keeping the rounding error for their next "
        "update (error feedback); the coordinator validates and restores float32 before "
        "aggregating",
        choices=tuple(SCHEMES),
    )
    #: Secure aggregation settings; None runs plain aggregation.
    secagg: SecAggParams | None = None
    dp: DPSettings | None = None
    #: Federated analytics for data scientists (``--scientists``); None: not served.
    analytics: AnalyticsSettings | None = None
    limits: Limits = field(default_factory=Limits)
    output: Output = field(default_factory=Output)
    security: Security = field(default_factory=Security)
    recovery: Recovery = field(default_factory=Recovery)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}")
        if self.min_workers < 1:
            raise ConfigError(f"--min-workers must be at least 1, got {self.min_workers}")
        if self.min_results is not None and self.min_results < 1:
            raise ConfigError(f"--min-results must be at least 1, got {self.min_results}")
        if self.compression not in SCHEMES:
            raise ConfigError(
                f"--compression must be one of {', '.join(SCHEMES)}, got {self.compression!r}"
            )
        if self.compression != "none" and self.secagg is not None:
            raise ConfigError(
                "--compression and --secagg cannot be combined: secure aggregation masks "
                "fixed-point updates, which cannot be compressed; drop one of the two"
            )
        if self.trainable and self.plan is not None:
            # Workers refuse it (rule frozen.plans): a plan's graph trains every parameter.
            raise ConfigError("--trainable cannot be combined with --ship-plan (a shipped plan)")
        if self.secagg is not None and self.min_workers < self.secagg.min_workers:
            # Round 1 starts with --min-workers workers: fewer than t cannot be unmasked.
            raise ConfigError(
                f"secure aggregation needs at least {self.secagg.min_workers} workers in a "
                f"round, and round 1 would start with {self.min_workers} (--min-workers); "
                f"pass --min-workers {self.secagg.min_workers}"
            )
        if self.limits.max_workers < self.min_workers:
            raise ConfigError("--max-workers cannot be below --min-workers")
        self.require_tags = tuple(dict.fromkeys(normalize_tag(t) for t in self.require_tags))
        split_listen(self.listen)
        require_tls_or_loopback(
            self.listen,
            tls=self.security.tls is not None,
            insecure=self.security.insecure,
            role="server",
        )
        tls = self.security.tls
        require_authentication_off_loopback(
            self.listen,
            enrolled=self.security.enrolled is not None,
            mutual_tls=tls is not None and tls.mutual,
            insecure=self.security.insecure,
        )

    @classmethod
    def from_flags(cls, **options: Any) -> ServerConfig:
        """A config from flat keywords named like ``fed-server``'s flags (``rounds=5``,
        ``round_timeout=30``, ``metrics_out=Path("m.jsonl")``): each goes to its group."""
        owner = {f.name: group for group, kind in _GROUPS.items() for f in fields(kind)}
        grouped: dict[str, dict[str, Any]] = {group: {} for group in _GROUPS}
        top: dict[str, Any] = {}
        own = {f.name for f in fields(cls)} - set(_GROUPS)
        for key, value in options.items():
            if key in owner:
                grouped[owner[key]][key] = value
            elif key in own:
                top[key] = value
            else:
                raise ConfigError(f"unknown coordinator setting {key!r}")
        for group, kind in _GROUPS.items():
            top[group] = kind(**grouped[group])
        return cls(**top)

    def describe(self) -> dict[str, str]:
        """The settings that tell runs apart, as strings (experiment trackers' parameters)."""
        described: dict[str, object] = {
            "model": self.model,
            "strategy": self.strategy,
            "strategy_options": self.strategy_options,
            "rounds": self.rounds,
            "min_workers": self.min_workers,
            "min_results": self.results_needed,
            "seed": self.seed,
            "epochs": self.train.epochs,
            "batch_size": self.train.batch_size,
            "optimizer": self.train.optimizer,
            "learning_rate": self.train.learning_rate,
            "compression": self.compression,
            # LoRA (named trainable parameters) and full fine-tuning must not look alike.
            "trainable": ",".join(self.trainable) if self.trainable else "all",
            "secagg": self.secagg is not None,
            "dp": self.dp,
        }
        return {k: str(v) for k, v in described.items()}

    @property
    def results_needed(self) -> int:
        """Valid results a round needs to count (``--min-results``, default ``--min-workers``)."""
        return self.min_results if self.min_results is not None else self.min_workers
