"""A worker's policy: what its data owner accepts, parsed from ``policy.toml``.

Every section is optional; an absent rule allows everything it would have restricted::

    [models]
    allowed = ["mnist-mlp", "mnist-cnn"]   # model names the plans may use
    max-parameters = 2_000_000             # ... and their size (counted from the weights sent)

    [training]
    max-epochs = 2                         # local epochs per round (default 100)
    max-batch-size = 4096                  # default 65,536
    min-learning-rate = 1e-6               # a finite learning rate in [min, max]
    max-learning-rate = 10.0               # (defaults 1e-6 and 10)
    allow-evaluation = true                # run federated-evaluation tasks (default: true,
                                           # false when DP is required or a budget is kept)
    evaluation-noise-multiplier = 5.0      # with DP required or a budget: the evaluation
                                           # accuracy is released with this Gaussian noise
    max-silos = 20                         # distributed DP: share noise with at most 20
    honest-silos = 1                       # silos, of which this many (itself included) are
                                           # assumed to add their share (default 1: it adds
                                           # the whole noise alone)

    [secure-aggregation]
    required = true                        # never send an unmasked update
    min-group-size = 3                     # share keys with at least 2 neighbours (default 3)
    min-threshold = 0.5                    # Shamir threshold t > 0.5 x group (default 0.5)
    max-silos = 20                         # refuse secure rounds of more silos (sybils)
    signing-key = "hospital-a.signing.pem" # signed mode: this silo's key (fed-certs), and
    roster = "roster.json"                 # the silos it accepts (both relative to this
                                           # file's folder; --signing-key/--roster override)
    [secure-aggregation.peers]             # or pin the peers here instead of a roster:
    hospital-b = "9f86d0...64 hex digits"  # name = SHA-256 of its signing key

    [differential-privacy]
    required = "client-level"              # or "record-level", or "either"
    min-noise-multiplier = 1.0             # client-level DP: the plan's z must be at least this
    max-clip-norm = 1.0                    # client-level DP: the plan's clip norm at most this
    dpsgd-min-noise-multiplier = 1.0       # record-level DP-SGD on this worker: bounds on its
    dpsgd-max-grad-norm = 1.0              # own settings
    dpsgd-secure-mode = true               # DP-SGD runs Opacus' secure mode (needs torchcsprng)

    [budget]                               # this silo's privacy budget, across federations
    study = "mnist-2026"                   # rounds of every federation of the study count
    epsilon = 8.0
    delta = 1e-5
    ledger = "privacy-ledger.json"         # relative to this file's folder

    [dataset]
    release-label-histogram = true         # advertise per-label counts, with Gaussian noise
    label-histogram-noise-multiplier = 20.0  # of std 20 (charged to the budget, released once)
    label-histogram-labels = 10            # labels 0..9 are counted

    [coordinators]
    allowed = ["coordinator.example.org"]  # TLS identities this worker trains for

    [plans]                                # models shipped as programs (docs/plans.md)
    accept = true                          # run verified plans at all
    require-approval = true                # ... only once the data owner approved the hash
    requests = "plan-requests"             # the request queue (relative to this file's folder)
    max-pending = 16                       # the queue's caps: requests awaiting a decision,
    max-queue-bytes = 268_435_456          # bytes of queued programs (256 MiB),
    max-requests-per-day = 16              # new requests per coordinator in 24 hours
    accept-buffers = ["batch-norm-statistics", "batch-counter"]  # buffer kinds a plan may
                                           # update and whose trained values leave (the default)
    sandbox = true                         # train and evaluate plans in a limited child process
    sandbox-memory-bytes = 8_589_934_592   # its address-space limit (default: half the RAM,
                                           # at most 16 GiB)
    sandbox-cpu-seconds = 3600             # its CPU time per task
    max-activation-bytes = 2_000_000_000   # a plan's tensors at most (default: 1/4 of memory)
    [jobs]                                 # a standing network's jobs (docs/network.md)
    approval = "always"                    # every job (and query) waits for the data owner's
                                           # decision in the [plans] requests queue
                                           # (default "plans": only shipped plans, as above)
    max-tasks = 2                          # training tasks of different jobs run at once
                                           # (default 1: one after another)
    [analytics]                            # answer federated-analytics queries on a table
    allowed-columns = ["age", "bmi", "sex"]  # columns queries may read (default: all declared)
    max-epsilon = 1.0                      # per query, at the budget's delta (default 1.0);
                                           # queries are charged to the [budget] above
    max-delta = 1e-6                       # per query (default: the budget's delta)
    max-silos = 20                         # as in [training]: the network this silo accepts
    honest-silos = 1                       # to share a query's noise with (default 1: alone)

Without a policy file (and for every key it leaves out) the defaults above apply: the
worker's gate (``fedcore.worker.gate``) always enforces them.

Unknown sections and keys are errors (:class:`~fedcore.errors.PolicyError`), so a typo can
never silently drop a rule.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from fedcore.errors import PolicyError
from fedcore.toml_fields import StrictTable, read_toml

log = logging.getLogger("fedcore.policy")

__all__ = [
    "BUFFER_KINDS",
    "DP_KINDS",
    "JOB_APPROVAL",
    "MAX_TASKS_LIMIT",
    "AnalyticsRules",
    "BudgetRules",
    "DPKind",
    "DatasetRules",
    "ModelRules",
    "NoiseNetwork",
    "PlanRules",
    "Policy",
    "PrivacyRules",
    "SigningRules",
    "TrainingRules",
    "load_policy",
    "parse_policy",
]

#: Buffer kinds a policy may accept (``[plans] accept-buffers``): what a plan may update in
#: its graph (fedcore.plans.dataflow) and whose trained values leave (worker/plan_state.py).
BUFFER_KINDS = ("batch-norm-statistics", "batch-counter")
#: Old names: ``batch-norm`` was both kinds (before the two ``[plans]`` keys became one).
_BUFFER_KIND_ALIASES = {"batch-norm": BUFFER_KINDS}

DPKind = Literal["client-level", "record-level", "either"]
DP_KINDS: tuple[DPKind, ...] = ("client-level", "record-level", "either")

_SECTIONS = (
    "models",
    "training",
    "secure-aggregation",
    "differential-privacy",
    "budget",
    "dataset",
    "coordinators",
    "plans",
    "analytics",
    "release",
    "jobs",
)

#: ``[jobs] approval``: ``plans``: only shipped plans wait for the owner (``[plans]
#: require-approval``); ``always``: every job's tasks, and every query, do.
JOB_APPROVAL = ("plans", "always")
#: ``[jobs] max-tasks`` at most: each task holds a model, its update and a training thread.
MAX_TASKS_LIMIT = 64

#: ``[release] model``: whether models trained on this silo's data may be released to the
#: data scientist of a standing network's job (``dp-only``: only from a job with client-level
#: differential privacy).
RELEASE_MODEL = ("allowed", "dp-only", "never")


@dataclass(frozen=True)
class ModelRules:
    """Which models plans may name (None: any), and how many parameters they may have."""

    allowed: tuple[str, ...] | None = None
    max_parameters: int | None = None


#: Training-config bounds that hold without a policy file (see the module docstring).
DEFAULT_MAX_EPOCHS = 100
DEFAULT_MAX_BATCH_SIZE = 65_536
DEFAULT_MIN_LEARNING_RATE = 1e-6
DEFAULT_MAX_LEARNING_RATE = 10.0
DEFAULT_MIN_GROUP_SIZE = 3
DEFAULT_MIN_THRESHOLD = 0.5


@dataclass(frozen=True)
class NoiseNetwork:
    """The network a silo accepts to share distributed DP noise with (issue 22).

    ``max_silos``: the most silos a release may claim to share the noise with (None: any).
    ``honest_silos``: how many of them, this silo included, it assumes add their share; it
    adds ``1 / min(honest_silos, claimed)`` of the noise variance, so the honest shares alone
    carry the whole noise whatever the coordinator claims. Default 1: it adds the whole noise.
    """

    max_silos: int | None = None
    honest_silos: int = 1

    def share_divisor(self, claimed: int) -> int:
        """How many silos' shares this silo relies on for the whole noise: the coordinator's
        ``claimed`` count only ever lowers it below the policy's ``honest_silos``."""
        return max(1, min(self.honest_silos, claimed))

    def describe(self) -> str:
        most = f"at most {self.max_silos} silos" if self.max_silos is not None else "any silos"
        if self.honest_silos == 1:
            return f"noise shared with {most}, the whole noise added alone"
        return f"noise shared with {most}, {self.honest_silos} of them assumed honest"


@dataclass(frozen=True)
class TrainingRules:
    """Bounds on a plan's training config, and whether evaluation tasks run.

    ``allow_evaluation`` None means the default: evaluation runs unless the policy requires
    DP or keeps a budget (then its metrics would be an unaccounted release).
    """

    max_epochs: int | None = None
    allow_evaluation: bool | None = None
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    min_learning_rate: float = DEFAULT_MIN_LEARNING_RATE
    max_learning_rate: float = DEFAULT_MAX_LEARNING_RATE
    evaluation_noise_multiplier: float | None = None
    network: NoiseNetwork = field(default_factory=NoiseNetwork)

    @property
    def epochs_limit(self) -> int:
        return self.max_epochs if self.max_epochs is not None else DEFAULT_MAX_EPOCHS


@dataclass(frozen=True)
class SigningRules:
    """Signed secure aggregation, from the policy: this silo's signing key and the peers it
    accepts (a roster file, or fingerprints pinned in the policy itself)."""

    signing_key: Path | None = None
    roster: Path | None = None
    peers: tuple[tuple[str, str], ...] | None = None  # (name, hex SHA-256 of its key)


@dataclass(frozen=True)
class PrivacyRules:
    """Secure aggregation and differential privacy a plan must use."""

    require_secagg: bool = False
    min_group_size: int = DEFAULT_MIN_GROUP_SIZE
    min_threshold: float = DEFAULT_MIN_THRESHOLD
    max_silos: int | None = None
    signing: SigningRules = field(default_factory=SigningRules)
    require_dp: DPKind | None = None
    min_noise_multiplier: float | None = None
    max_clip_norm: float | None = None
    dpsgd_min_noise_multiplier: float | None = None
    dpsgd_max_grad_norm: float | None = None
    dpsgd_secure_mode: bool = False


@dataclass(frozen=True)
class BudgetRules:
    """The silo's privacy budget: ``epsilon`` at ``delta`` over every round of ``study``."""

    study: str
    epsilon: float
    delta: float
    ledger: Path


@dataclass(frozen=True)
class DatasetRules:
    release_label_histogram: bool = False
    label_histogram_noise_multiplier: float | None = None
    label_histogram_labels: int | None = None


DEFAULT_MAX_QUERY_EPSILON = 1.0


@dataclass(frozen=True)
class AnalyticsRules:
    """What federated-analytics queries may read and release (``[analytics]``).

    ``allowed_columns`` None: every column the table's metadata declares. ``max_epsilon``
    bounds what one query costs at the budget's delta (the ledger's), whatever delta the query
    names; ``max_delta`` bounds that delta (the parser fills in the budget's delta when the
    file names none; None admits no delta at all: fail closed).
    """

    allowed_columns: tuple[str, ...] | None = None
    max_epsilon: float = DEFAULT_MAX_QUERY_EPSILON
    max_delta: float | None = None
    network: NoiseNetwork = field(default_factory=NoiseNetwork)


@dataclass(frozen=True)
class PlanRules:
    """Models shipped as programs (``fed-server --ship-plan``; see docs/plans.md).

    ``accept``: run verified plans at all. ``require_approval``: run a plan only after the
    data owner approved its hash and terms (``fed-worker requests approve``); unknown plans
    wait in the request queue at ``requests``, within its caps (``max_pending`` undecided
    requests, ``max_queue_bytes`` of programs, ``max_requests_per_day`` new requests from one
    coordinator). ``accept_buffers``: the buffer kinds (:data:`BUFFER_KINDS`) a plan may
    update in its graph (the verifier refuses any other update) and whose trained values are
    uploaded (``worker/plan_state.py``); any other buffer goes back as received. ``sandbox``: plans
    train and evaluate in a child process limited to ``sandbox_memory_bytes`` of address
    space and ``sandbox_cpu_seconds`` of CPU time per task (``worker/sandbox.py``).
    ``max_activation_bytes``: the memory a plan's tensors may take (None: a quarter of
    physical memory).
    """

    accept: bool = True
    require_approval: bool = False
    requests: Path | None = None
    max_pending: int = 16
    max_queue_bytes: int = 256 * 1024 * 1024
    max_requests_per_day: int = 16
    accept_buffers: tuple[str, ...] = BUFFER_KINDS
    sandbox: bool = True
    sandbox_memory_bytes: int = field(default_factory=lambda: default_sandbox_memory())
    sandbox_cpu_seconds: int = 3600
    max_activation_bytes: int | None = None


def _buffer_kinds(listed: Sequence[str]) -> tuple[str, ...]:
    """``listed`` with old kind names read as the kinds they stood for."""
    return tuple(k for name in listed for k in _BUFFER_KIND_ALIASES.get(name, (name,)))


def default_sandbox_memory() -> int:
    """Half the machine's memory, at most 16 GiB (a plan's child never takes the host's)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        physical = 16 * 1024**3
    return int(min(physical // 2, 16 * 1024**3))


@dataclass(frozen=True)
class Policy:
    """Everything a data owner's ``policy.toml`` says (see the module docstring)."""

    models: ModelRules = field(default_factory=ModelRules)
    training: TrainingRules = field(default_factory=TrainingRules)
    privacy: PrivacyRules = field(default_factory=PrivacyRules)
    budget: BudgetRules | None = None
    dataset: DatasetRules = field(default_factory=DatasetRules)
    allowed_coordinators: tuple[str, ...] | None = None
    source: str = "policy"
    #: None: this worker answers no analytics queries.
    analytics: AnalyticsRules | None = None
    plans: PlanRules = field(default_factory=PlanRules)
    #: ``[release] model``: one of :data:`RELEASE_MODEL`.
    release_model: str = "allowed"
    #: ``[jobs] approval``: one of :data:`JOB_APPROVAL`.
    job_approval: str = "plans"
    #: ``[jobs] max-tasks``: training tasks (of different jobs) this worker runs at once.
    max_tasks: int = 1

    @property
    def private(self) -> bool:
        """Every number leaving the worker must be DP: the policy requires DP or keeps a
        budget. Evaluation is then off unless allowed explicitly, with noise."""
        return self.privacy.require_dp is not None or self.budget is not None

    @property
    def evaluation_allowed(self) -> bool:
        allowed = self.training.allow_evaluation
        return (not self.private) if allowed is None else allowed

    def describe(self) -> list[str]:
        """The rules in force, one line each (logged by the worker at start)."""
        lines = []
        if self.models.allowed is not None:
            lines.append(f"models: {', '.join(self.models.allowed)}")
        if self.models.max_parameters is not None:
            lines.append(f"at most {self.models.max_parameters:,} parameters")
        if self.training.max_epochs is not None:
            lines.append(f"at most {self.training.max_epochs} local epoch(s) per round")
        if self.training.network != NoiseNetwork():
            lines.append(f"distributed training noise: {self.training.network.describe()}")
        if not self.evaluation_allowed:
            lines.append("no federated evaluation")
        elif self.private:
            z = self.training.evaluation_noise_multiplier
            noise = f"noise multiplier {z:g}" if z is not None else "no noise configured"
            lines.append(f"evaluation accuracy released with {noise}")
        if self.privacy.require_secagg:
            lines.append("secure aggregation required")
        if self.privacy.max_silos is not None:
            lines.append(f"secure rounds of at most {self.privacy.max_silos} silos")
        if self.privacy.signing != SigningRules():
            lines.append("signed secure aggregation (signing key and peers from the policy)")
        if self.privacy.require_dp is not None:
            lines.append(f"differential privacy required ({self.privacy.require_dp})")
        if self.privacy.min_noise_multiplier is not None:
            lines.append(f"client-level noise multiplier >= {self.privacy.min_noise_multiplier:g}")
        if self.privacy.max_clip_norm is not None:
            lines.append(f"client-level clip norm <= {self.privacy.max_clip_norm:g}")
        if self.privacy.dpsgd_secure_mode:
            lines.append("DP-SGD in Opacus' secure mode")
        if self.budget is not None:
            b = self.budget
            lines.append(
                f"privacy budget epsilon {b.epsilon:g} at delta {b.delta:g} for study "
                f"{b.study!r} (ledger {b.ledger})"
            )
        if self.dataset.release_label_histogram:
            lines.append("releases a noisy label histogram")
        if self.allowed_coordinators is not None:
            lines.append(f"coordinators: {', '.join(self.allowed_coordinators)}")
        if not self.plans.accept:
            lines.append("no shipped plans")
        elif self.plans.require_approval:
            lines.append(f"plans need the data owner's approval (queue {self.plans.requests})")
        if self.analytics is not None:
            a = self.analytics
            columns = ", ".join(a.allowed_columns) if a.allowed_columns is not None else "all"
            lines.append(
                f"analytics queries on columns {columns}, epsilon <= {a.max_epsilon:g} per "
                f"query at the budget's delta, delta <= {a.max_delta:g}; " + a.network.describe()
            )
        if self.release_model != "allowed":
            lines.append(f"trained models released: {self.release_model}")
        if self.job_approval == "always":
            lines.append(
                f"every job and query needs the data owner's approval (queue {self.plans.requests})"
            )
        if self.max_tasks > 1:
            lines.append(f"up to {self.max_tasks} tasks of different jobs at once")
        return lines or ["no restrictions"]


def load_policy(path: Path) -> Policy:
    """Read and check ``policy.toml``.

    Raises:
        PolicyError: unreadable, not TOML, an unknown section or key, or a bad value.
    """
    return parse_policy(read_toml(path, PolicyError, "policy file"), path)


def parse_policy(document: dict[str, Any], path: Path) -> Policy:
    """The :class:`Policy` of an already parsed TOML document read from ``path``."""
    where = f"policy file {path}"
    top = StrictTable(document, where, _SECTIONS, PolicyError)

    def section(name: str, keys: tuple[str, ...]) -> StrictTable:
        return StrictTable(top.table(name) or {}, f"{where} [{name}]", keys, PolicyError)

    m = section("models", ("allowed", "max-parameters"))
    models = ModelRules(m.strings("allowed"), m.integer("max-parameters", minimum=1))

    t = section(
        "training",
        (
            "max-epochs",
            "max-batch-size",
            "min-learning-rate",
            "max-learning-rate",
            "allow-evaluation",
            "evaluation-noise-multiplier",
            *_NETWORK_KEYS,
        ),
    )
    training = TrainingRules(
        max_epochs=t.integer("max-epochs", minimum=1),
        allow_evaluation=t.boolean("allow-evaluation"),
        max_batch_size=_or(t.integer("max-batch-size", minimum=1), DEFAULT_MAX_BATCH_SIZE),
        min_learning_rate=_or(
            t.number("min-learning-rate", positive=True), DEFAULT_MIN_LEARNING_RATE
        ),
        max_learning_rate=_or(
            t.number("max-learning-rate", positive=True), DEFAULT_MAX_LEARNING_RATE
        ),
        evaluation_noise_multiplier=t.number("evaluation-noise-multiplier", positive=True),
        network=_network(t),
    )
    if training.min_learning_rate > training.max_learning_rate:
        raise t.fail("min-learning-rate", "is above max-learning-rate")

    s = section(
        "secure-aggregation",
        (
            "required",
            "min-group-size",
            "min-threshold",
            "max-silos",
            "signing-key",
            "roster",
            "peers",
        ),
    )
    require_secagg = _default(s.boolean("required"), False)
    min_group_size = _or(s.integer("min-group-size", minimum=2), DEFAULT_MIN_GROUP_SIZE)
    min_threshold = _or(s.number("min-threshold"), DEFAULT_MIN_THRESHOLD)
    if not 0 < min_threshold < 1:
        raise s.fail("min-threshold", f"must be a fraction in (0, 1), got {min_threshold}")
    max_silos = s.integer("max-silos", minimum=2)
    if max_silos is not None and max_silos < min_group_size:
        raise s.fail("max-silos", f"is below min-group-size ({max_silos} < {min_group_size})")
    signing = _signing(s, path)

    d = section(
        "differential-privacy",
        (
            "required",
            "min-noise-multiplier",
            "max-clip-norm",
            "dpsgd-min-noise-multiplier",
            "dpsgd-max-grad-norm",
            "dpsgd-secure-mode",
        ),
    )
    required = d.string("required")
    if required is not None and required not in DP_KINDS:
        raise d.fail("required", f"must be one of {', '.join(DP_KINDS)}, got {required!r}")
    privacy = PrivacyRules(
        require_secagg=require_secagg,
        min_group_size=min_group_size,
        min_threshold=min_threshold,
        max_silos=max_silos,
        signing=signing,
        require_dp=required,
        min_noise_multiplier=d.number("min-noise-multiplier", positive=True),
        max_clip_norm=d.number("max-clip-norm", positive=True),
        dpsgd_min_noise_multiplier=d.number("dpsgd-min-noise-multiplier", positive=True),
        dpsgd_max_grad_norm=d.number("dpsgd-max-grad-norm", positive=True),
        dpsgd_secure_mode=_default(d.boolean("dpsgd-secure-mode"), False),
    )

    budget = None
    if "budget" in document:
        b = section("budget", ("study", "epsilon", "delta", "ledger"))
        study = _required(b, "study", b.string("study"))
        epsilon = _required(b, "epsilon", b.number("epsilon", positive=True))
        delta = _required(b, "delta", b.number("delta", positive=True))
        ledger = _required(b, "ledger", b.string("ledger"))
        if not delta < 1:
            raise b.fail("delta", f"must be below 1 (take less than 1/records), got {delta}")
        ledger_path = Path(ledger).expanduser()
        if not ledger_path.is_absolute():
            ledger_path = path.parent / ledger_path
        budget = BudgetRules(study, epsilon, delta, ledger_path)

    ds = section(
        "dataset",
        ("release-label-histogram", "label-histogram-noise-multiplier", "label-histogram-labels"),
    )
    release = _default(ds.boolean("release-label-histogram"), False)
    noise = ds.number("label-histogram-noise-multiplier", positive=True)
    labels = ds.integer("label-histogram-labels", minimum=1)
    if release:
        if noise is None:
            raise ds.fail(
                "label-histogram-noise-multiplier",
                "is required to release a label histogram: the counts are only released with "
                "Gaussian noise of this standard deviation (e.g. 20)",
            )
        if labels is None:
            raise ds.fail(
                "label-histogram-labels",
                "is required to release a label histogram: the number of labels to count "
                "(labels 0 .. N-1), fixed in advance so the histogram's length reveals nothing",
            )
        if budget is None:
            raise ds.fail(
                "release-label-histogram",
                "needs a [budget] section: the noisy histogram is charged to the silo's "
                "budget and kept in its ledger, so a restart sends it again instead of "
                "drawing new noise",
            )
    dataset = DatasetRules(release, noise, labels)

    c = section("coordinators", ("allowed",))
    coordinators = c.strings("allowed")
    if coordinators is not None and not coordinators:
        raise c.fail("allowed", "is empty: it would refuse every coordinator; drop the key instead")

    pl = section(
        "plans",
        (
            "accept",
            "require-approval",
            "requests",
            "max-pending",
            "max-queue-bytes",
            "max-requests-per-day",
            "accept-buffers",
            "sandbox",
            "sandbox-memory-bytes",
            "sandbox-cpu-seconds",
            "max-activation-bytes",
            "accept-buffer-updates",
        ),
    )
    queue = Path(pl.string("requests") or "plan-requests").expanduser()
    listed = pl.strings("accept-buffers")
    legacy = pl.strings("accept-buffer-updates")
    if legacy is not None:
        if listed is not None:
            raise pl.fail(
                "accept-buffer-updates",
                "is the old name of accept-buffers (one key since issue 27); keep accept-buffers",
            )
        log.warning(
            "policy %s: [plans] accept-buffer-updates is deprecated; name it accept-buffers "
            "(one key for the buffers a plan may update and whose trained values leave)",
            path,
        )
        listed = legacy
    kinds = PlanRules.accept_buffers if listed is None else _buffer_kinds(listed)
    unknown = sorted(set(kinds) - set(BUFFER_KINDS))
    if unknown:
        raise pl.fail(
            "accept-buffers" if legacy is None else "accept-buffer-updates",
            f"unknown kind(s) {unknown}; the kinds are {', '.join(BUFFER_KINDS)}",
        )
    plans = PlanRules(
        accept=_default(pl.boolean("accept"), True),
        require_approval=_default(pl.boolean("require-approval"), False),
        requests=queue if queue.is_absolute() else path.parent / queue,
        max_pending=_or(pl.integer("max-pending", minimum=1), PlanRules.max_pending),
        max_queue_bytes=_or(pl.integer("max-queue-bytes", minimum=1), PlanRules.max_queue_bytes),
        max_requests_per_day=_or(
            pl.integer("max-requests-per-day", minimum=1), PlanRules.max_requests_per_day
        ),
        accept_buffers=tuple(dict.fromkeys(kinds)),
        sandbox=_default(pl.boolean("sandbox"), True),
        sandbox_memory_bytes=_or(
            pl.integer("sandbox-memory-bytes", minimum=256 * 1024 * 1024),
            default_sandbox_memory(),
        ),
        sandbox_cpu_seconds=_or(
            pl.integer("sandbox-cpu-seconds", minimum=1), PlanRules.sandbox_cpu_seconds
        ),
        max_activation_bytes=pl.integer("max-activation-bytes", minimum=1),
    )

    analytics = None
    if "analytics" in document:
        a = section(
            "analytics",
            ("allowed-columns", "min-count", "max-epsilon", "max-delta", *_NETWORK_KEYS),
        )
        if budget is None:
            raise a.fail(
                "max-epsilon",
                "needs a [budget] section: every query answer is charged to the silo's "
                "budget, in the same ledger as training",
            )
        if a.integer("min-count") is not None:
            # A rule kept silently would promise a suppression that no longer happens.
            raise a.fail(
                "min-count",
                "is no longer a rule: suppressing a cell by its exact count was itself an "
                "uncharged release of the data. Every cell is now released with DP noise "
                "(small cells show as small noisy counts); remove the key (docs/analytics.md)",
            )
        max_delta = _or(a.number("max-delta", positive=True), budget.delta)
        if not max_delta < 1:
            raise a.fail("max-delta", f"must be below 1, got {max_delta}")
        analytics = AnalyticsRules(
            a.strings("allowed-columns"),
            _or(a.number("max-epsilon", positive=True), DEFAULT_MAX_QUERY_EPSILON),
            max_delta,
            _network(a),
        )

    r = section("release", ("model",))
    release_model = r.string("model") or "allowed"
    if release_model not in RELEASE_MODEL:
        raise r.fail("model", f"must be one of {', '.join(RELEASE_MODEL)}, got {release_model!r}")
    j = section("jobs", ("approval", "max-tasks"))
    job_approval = j.string("approval") or "plans"
    if job_approval not in JOB_APPROVAL:
        raise j.fail("approval", f"must be one of {', '.join(JOB_APPROVAL)}, got {job_approval!r}")
    max_tasks = _or(j.integer("max-tasks", minimum=1), 1)
    if max_tasks > MAX_TASKS_LIMIT:
        raise j.fail(
            "max-tasks",
            f"is at most {MAX_TASKS_LIMIT} (each task holds its own model and update), "
            f"got {max_tasks}",
        )
    policy = Policy(
        models,
        training,
        privacy,
        budget,
        dataset,
        coordinators,
        str(path),
        analytics,
        plans=plans,
        release_model=release_model,
        job_approval=job_approval,
        max_tasks=max_tasks,
    )
    if (
        policy.private
        and policy.evaluation_allowed
        and training.evaluation_noise_multiplier is None
    ):
        raise t.fail(
            "allow-evaluation",
            "under required DP or a budget needs evaluation-noise-multiplier: evaluation "
            "metrics are released only with DP noise, charged to the budget",
        )
    return policy


_NETWORK_KEYS = ("max-silos", "honest-silos")
_FINGERPRINT_DIGITS = frozenset("0123456789abcdef")


def _relative(path: Path, value: str | None) -> Path | None:
    """A path of the policy, relative to its folder."""
    if value is None:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else path.parent / p


def _signing(table: StrictTable, path: Path) -> SigningRules:
    """The ``signing-key`` / ``roster`` / ``peers`` keys of ``[secure-aggregation]``."""
    key = _relative(path, table.string("signing-key"))
    roster = _relative(path, table.string("roster"))
    raw = table.table("peers")
    peers = None
    if raw is not None:
        if roster is not None:
            raise table.fail("peers", "and 'roster' both list the peers: keep one")
        for name, digest in raw.items():
            if not (
                isinstance(digest, str) and len(digest) == 64 and set(digest) <= _FINGERPRINT_DIGITS
            ):
                raise table.fail(
                    "peers", f"{name!r} must be the hex SHA-256 of its signing key (64 digits)"
                )
        if len(set(raw.values())) != len(raw):
            raise table.fail("peers", "lists one signing key for two silos")
        peers = tuple(sorted((str(n), str(d)) for n, d in raw.items()))
    if key is not None and roster is None and peers is None:
        raise table.fail("signing-key", "needs the peers it accepts: 'roster' or 'peers'")
    return SigningRules(key, roster, peers)


def _network(table: StrictTable) -> NoiseNetwork:
    """The ``max-silos`` / ``honest-silos`` keys of a section."""
    max_silos = table.integer("max-silos", minimum=1)
    honest = _or(table.integer("honest-silos", minimum=1), 1)
    if max_silos is not None and honest > max_silos:
        raise table.fail("honest-silos", f"is above max-silos ({honest} > {max_silos})")
    return NoiseNetwork(max_silos, honest)


T = TypeVar("T")


def _required(table: StrictTable, key: str, value: T | None) -> T:
    if value is None or value == "":
        raise table.fail(key, "is required in a [budget] section")
    return value


def _default(value: bool | None, default: bool) -> bool:
    return default if value is None else value


N = TypeVar("N", int, float)


def _or(value: N | None, default: N) -> N:
    return default if value is None else value
