"""fedcore: privacy-preserving cross-silo federated learning.

The coordinator lives in :mod:`fedcore.server`, the worker runtime in :mod:`fedcore.worker`;
this package holds what both share: plans, strategies, models, the tensor codec and errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# First: gRPC reads its log verbosity when it is imported (see fedcore.grpc_env).
import fedcore.grpc_env  # noqa: F401
from fedcore.analytics.client import connect
from fedcore.errors import (
    ConfigError,
    DataError,
    FedcoreError,
    ModelError,
    ModelMismatchError,
    PayloadError,
    ProtocolError,
    RejectedError,
    RoundFailedError,
    VersionMismatchError,
)
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.protocol import PROTOCOL_VERSION
from fedcore.strategy import (
    AsyncSettings,
    ClientSampler,
    EvaluateResult,
    Failure,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedBuff,
    FedProx,
    FedYogi,
    FitInstruction,
    FitResult,
    Strategy,
    UpdateAggregator,
    WeightedMeanAggregator,
    WorkerInfo,
    load_strategy,
)
from fedcore.weights import ModelSignature, TensorSignature, Weights

if TYPE_CHECKING:
    from fedcore.models import (
        available_models,
        build_model,
        get_weights,
        register_model,
        set_weights,
    )

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "AsyncSettings",
    "ClientSampler",
    "ConfigError",
    "DataError",
    "EvaluateResult",
    "Failure",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedProx",
    "FedYogi",
    "FedcoreError",
    "FitInstruction",
    "FitResult",
    "ModelError",
    "ModelMismatchError",
    "ModelSignature",
    "ModelSpec",
    "PayloadError",
    "ProtocolError",
    "RejectedError",
    "RoundFailedError",
    "Strategy",
    "TensorSignature",
    "TrainConfig",
    "UpdateAggregator",
    "VersionMismatchError",
    "WeightedMeanAggregator",
    "Weights",
    "WorkerInfo",
    "__version__",
    "available_models",
    "build_model",
    "connect",
    "get_weights",
    "load_strategy",
    "register_model",
    "set_weights",
]


_MODEL_NAMES = {"available_models", "build_model", "get_weights", "register_model", "set_weights"}


def __getattr__(name: str) -> Any:
    # The model zoo needs torch (seconds to import): loaded on first use, so commands that
    # never build a model (fed-query, fed-worker requests) start without it.
    if name in _MODEL_NAMES:
        from fedcore import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
