"""The one exception tree of fedcore.

Every error fedcore raises on purpose derives from :class:`FedcoreError`, so a caller can
catch them all at once, or pick the branch it can act on::

    FedcoreError
    ├── ConfigError            a flag, config file or option is wrong (fix the command line)
    │   └── PolicyError            a worker's policy file is invalid (fix the policy file)
    ├── DataError              a dataset or shard cannot be read or fails its checksum
    ├── ModelError             a model cannot be built, or two sides disagree on its shape
    │   ├── ModelMismatchError parameter names, shapes or dtypes differ between two sides
    │   └── PlanError          a model cannot be exported as a plan, or a plan file is unusable
    │       └── PlanRejectedError  a received plan fails verification (names the node)
    ├── ProtocolError          a peer sent something that breaks the fedcore v1 protocol
    │   ├── VersionMismatchError   the peer speaks another protocol version
    │   └── PayloadError           a tensor payload is malformed, oversized or not finite
    ├── LedgerError            a worker's privacy ledger cannot be read, locked or written
    ├── TaskRefused            a worker's gate refused a task: ``rule`` names the rule broken
    │   └── AwaitingApproval       the plan waits for its data owner's decision (not a failure)
    ├── RejectedError          the coordinator refused this worker (the reason says why)
    │   └── AuthenticationError    unknown, revoked or unproven worker identity
    │       └── IdentityMismatchError  the proven identity is not the name claimed
    ├── CheckpointError        a checkpoint cannot be written, read, or does not fit the run
    ├── RoundFailedError       a round could not gather enough results, even after retries
    ├── TrainingFailed         a worker's local training produced no usable update
    ├── PrivacyBudgetExhausted one more round would spend more privacy than the budget allows
    ├── QueryRefusedError      an analytics query was refused by a silo, or could not be answered
    └── SecAggError            secure aggregation could not complete a round
        ├── SecAggAbortedError     fewer than the threshold t of workers remain: nothing revealed
        └── SecAggRefusedError     a worker refused a request that would break a peer's privacy

Messages say what went wrong *and* what to do about it.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "AwaitingApproval",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FedcoreError",
    "IdentityMismatchError",
    "LedgerError",
    "ModelError",
    "ModelMismatchError",
    "PayloadError",
    "PlanError",
    "PlanRejectedError",
    "PolicyError",
    "PrivacyBudgetExhausted",
    "ProtocolError",
    "QueryRefusedError",
    "RejectedError",
    "RoundFailedError",
    "SecAggAbortedError",
    "SecAggError",
    "SecAggRefusedError",
    "TaskRefused",
    "TrainingFailed",
    "VersionMismatchError",
]


class FedcoreError(Exception):
    """Base class of every error raised by fedcore on purpose."""


class ConfigError(FedcoreError):
    """A command-line flag, config file entry or API option is invalid."""


class PolicyError(ConfigError):
    """A worker's policy file is invalid: an unknown section or key, a bad value."""


class LedgerError(FedcoreError):
    """A worker's privacy ledger is unreadable, corrupt, locked too long, or cannot be written."""


class TaskRefused(FedcoreError):
    """A worker's gate refused a task before any of it ran (or before its result left).

    ``rule`` names the rule (``"model.allowed"``, ``"training.learning-rate"``, a policy key);
    the message says what the plan did and what the coordinator would have to change.
    """

    def __init__(self, rule: str, reason: str, *, by: str = "gate") -> None:
        super().__init__(f"refused by the worker's {by} [{rule}]: {reason}")
        self.rule = rule
        self.reason = reason


class AwaitingApproval(TaskRefused):
    """A plan the data owner has not decided on yet: not a failure of the plan. The worker
    answers ``ERROR_CODE_AWAITING_APPROVAL`` and the coordinator's round waits for the decision
    (``--approval-timeout``) instead of counting the refusal as one a retry would repeat."""


class DataError(FedcoreError):
    """A dataset or shard is missing, unreadable, or fails its checksum."""


class ModelError(FedcoreError):
    """A model cannot be resolved or built."""


class ModelMismatchError(ModelError):
    """Two sides disagree on the model's parameter names, shapes or dtypes."""


class PlanError(ModelError):
    """A model cannot be exported as a plan, or a plan (file) cannot be used."""


class PlanRejectedError(PlanError):
    """A received plan fails verification: an operation off the allow-list, a Python callable,
    a pickled or custom object, an oversized tensor, malformed JSON. The message names the
    offending node."""


class ProtocolError(FedcoreError):
    """A peer sent a message that breaks the fedcore v1 protocol."""


class VersionMismatchError(ProtocolError):
    """The peer speaks an incompatible protocol version."""


class PayloadError(ProtocolError):
    """A tensor payload is malformed, oversized, or holds NaN/Inf values."""


class RejectedError(FedcoreError):
    """The coordinator refused this worker; the message carries its reason."""


class AuthenticationError(RejectedError):
    """A worker's identity is unknown, revoked, or not proven by its token or certificate."""


class IdentityMismatchError(AuthenticationError):
    """A worker proved one identity and claimed another name."""


class CheckpointError(FedcoreError):
    """A checkpoint cannot be written or read, or belongs to a different federation."""


class RoundFailedError(FedcoreError):
    """A round could not gather enough valid results, even after its retries.

    ``answers``: the failures the workers answered with, by worker name (a refusal names its
    rule: a standing network's job waits on ``plans.approval`` refusals, see server/jobs/).
    """

    def __init__(self, message: str, *, answers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.answers = dict(answers or {})


class TrainingFailed(FedcoreError):
    """Local training did not produce a usable update (for example the loss diverged)."""


class PrivacyBudgetExhausted(FedcoreError):
    """One more round would take epsilon past the configured privacy budget.

    The coordinator ends the federation cleanly (keeping the last released model); a DP-SGD
    silo refuses to train further.
    """


class SecAggError(FedcoreError):
    """Secure aggregation could not complete a round (bad share, tampered message, ...)."""


class SecAggAbortedError(SecAggError):
    """Fewer workers than the Shamir threshold remain; the round ends and reveals nothing."""


class SecAggRefusedError(SecAggError):
    """An honest worker refused a request that would reveal more than the protocol allows."""


class QueryRefusedError(FedcoreError):
    """A federated-analytics query was not answered: a silo refused it (its rule and reason
    are in the message), or too few silos hold the data, or the secure round failed."""
