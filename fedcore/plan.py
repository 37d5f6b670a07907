"""Plans: what a worker is asked to run (model spec and training config), as plain dataclasses.

These mirror the protobuf messages so that strategies and trainers never touch protobuf.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fedcore.errors import ConfigError
from fedcore.flags import setting
from fedcore.v1 import fedcore_pb2 as pb

__all__ = ["PROXIMAL_MU", "ModelSpec", "TrainConfig"]

#: ``TrainConfig.extra`` key of FedProx's proximal coefficient mu (Li et al. 2020).
PROXIMAL_MU = "proximal_mu"

_OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class ModelSpec:
    """A registered model name (or ``package.module:factory``) and its hyper-parameters."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_proto(self) -> pb.ModelSpec:
        return pb.ModelSpec(name=self.name, params_json=json.dumps(self.params, sort_keys=True))

    @classmethod
    def from_proto(cls, msg: pb.ModelSpec) -> ModelSpec:
        try:
            params = json.loads(msg.params_json) if msg.params_json else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model {msg.name!r} has malformed params_json: {exc}") from None
        if not isinstance(params, dict):
            raise ConfigError(f"model {msg.name!r}: params_json must be a JSON object")
        return cls(msg.name, params)

    def __str__(self) -> str:
        if not self.params:
            return self.name
        args = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.name}({args})"


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings sent with every fit task."""

    # Each field's help is its fed-server flag's (fedcore.flags); seed is --seed's.
    epochs: int = setting(1, "local epochs per round")
    batch_size: int = setting(32, "")
    optimizer: str = setting("sgd", "", choices=("sgd", "adam"))
    learning_rate: float = setting(0.05, "learning rate", flag="--lr")
    momentum: float = setting(0.0, "SGD momentum")
    weight_decay: float = setting(0.0, "")
    seed: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    #: The parameters to train, the others stay as received (empty: all). Not sent: the worker
    #: sets it from the plan's payload, which holds only the trainable parameters.
    trainable: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if self.optimizer not in _OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning rate must be positive, got {self.learning_rate}")

    def to_proto(self) -> pb.TrainConfig:
        return pb.TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            learning_rate=self.learning_rate,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            seed=self.seed,
            extra=self.extra,
        )

    @classmethod
    def from_proto(cls, msg: pb.TrainConfig) -> TrainConfig:
        return cls(
            epochs=msg.epochs,
            batch_size=msg.batch_size,
            optimizer=msg.optimizer,
            learning_rate=msg.learning_rate,
            momentum=msg.momentum,
            weight_decay=msg.weight_decay,
            seed=msg.seed,
            extra=dict(msg.extra),
        )
