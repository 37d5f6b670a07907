"""What a worker runs: the :class:`Trainer` interface and the default PyTorch implementation.

Plug in any ``torch.utils.data.Dataset`` and, optionally, your own training or evaluation
loop::

    def my_loop(model, dataset, config, device) -> fedcore.training.TrainResult: ...

    trainer = TorchTrainer(my_dataset, train_fn=my_loop)
    await Worker("coordinator:50051", "hospital-a", trainer).run()
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from fedcore.errors import ConfigError, FedcoreError, ModelMismatchError
from fedcore.models import build_model, get_weights, set_weights
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.training import Batch, EvalResult, TrainResult, evaluate, train, warm_up
from fedcore.weights import ModelSignature, Weights, signature_of

__all__ = ["EchoTrainer", "EvalOutput", "FitOutput", "TorchTrainer", "Trainer", "TrainingFailed"]


class TrainingFailed(FedcoreError):
    """Local training did not produce a usable update (for example the loss diverged)."""


@dataclass
class FitOutput:
    """A training result: the updated weights (or their delta) and what to report."""

    weights: Weights
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    is_delta: bool = False


@dataclass
class EvalOutput:
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Trainer(ABC):
    """Runs plans on local data. Methods are called from a worker thread, one at a time."""

    @property
    @abstractmethod
    def num_examples(self) -> int:
        """Size of the local training set (advertised in the hello)."""

    def announced_model(self) -> tuple[ModelSpec, ModelSignature] | None:
        """The model this trainer was set up for, if any: checked by the coordinator at join."""
        return None

    @abstractmethod
    def fit(self, model: ModelSpec, weights: Weights, config: TrainConfig) -> FitOutput:
        """Train from ``weights`` and return the update."""

    @abstractmethod
    def evaluate(self, model: ModelSpec, weights: Weights) -> EvalOutput:
        """Evaluate ``weights`` on local data."""


TrainFn = Callable[[nn.Module, Dataset[Batch], TrainConfig, torch.device], TrainResult]
EvalFn = Callable[[nn.Module, Dataset[Batch], torch.device], EvalResult]


def _default_train(
    model: nn.Module, data: Dataset[Batch], config: TrainConfig, device: torch.device
) -> TrainResult:
    return train(model, data, config, device=device)


def _default_eval(model: nn.Module, data: Dataset[Batch], device: torch.device) -> EvalResult:
    return evaluate(model, data, device=device)


class TorchTrainer(Trainer):
    """Trains registered (or user) PyTorch models on a local dataset.

    Args:
        train_data: the local training set.
        eval_data: local test set for federated evaluation (default: the training set).
        model: when given, the only model this worker accepts; announced at join.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        train_fn / eval_fn: replace the default loops.
    """

    def __init__(
        self,
        train_data: Dataset[Batch],
        *,
        eval_data: Dataset[Batch] | None = None,
        model: ModelSpec | None = None,
        device: str = "cpu",
        train_fn: TrainFn = _default_train,
        eval_fn: EvalFn = _default_eval,
    ) -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {device} asked for, but torch sees no CUDA device")
        self._train_data = train_data
        self._eval_data = eval_data if eval_data is not None else train_data
        self._device = torch.device(device)
        self._train_fn = train_fn
        self._eval_fn = eval_fn
        self._expected = model
        self._cached: tuple[ModelSpec, nn.Module] | None = None
        self._announced: tuple[ModelSpec, ModelSignature] | None = None
        if model is not None:
            self._announced = (model, signature_of(get_weights(self._model_for(model))))
        # Torch's one-time imports run while the worker connects (see training.warm_up).
        self._warm = threading.Thread(target=warm_up, name="fedcore-warm-up", daemon=True)
        self._warm.start()

    @property
    def num_examples(self) -> int:
        return len(self._train_data)  # type: ignore[arg-type]

    def announced_model(self) -> tuple[ModelSpec, ModelSignature] | None:
        return self._announced

    def _model_for(self, spec: ModelSpec) -> nn.Module:
        if self._expected is not None and spec.name != self._expected.name:
            raise ModelMismatchError(
                f"this worker runs model {self._expected.name}, the plan asks for {spec.name}"
            )
        if self._cached is None or self._cached[0] != spec:
            self._cached = (spec, build_model(spec).to(self._device))
        return self._cached[1]

    def _wait_for_warm_up(self) -> None:
        # Never import the same modules from two threads at once.
        self._warm.join(timeout=600)

    def fit(self, model: ModelSpec, weights: Weights, config: TrainConfig) -> FitOutput:
        self._wait_for_warm_up()
        net = self._model_for(model)
        set_weights(net, weights)
        if config.trainable:
            # Frozen parameters get no gradient, so no optimizer step or weight decay moves them.
            keep = set(config.trainable)
            for name, parameter in net.named_parameters():
                parameter.requires_grad_(name in keep)
        result = self._train_fn(net, self._train_data, config, self._device)
        updated = get_weights(net)
        for name, array in updated.items():
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise TrainingFailed(
                    f"training produced NaN/Inf in {name!r} (loss {result.loss:.4g}); "
                    "lower the learning rate"
                )
        metrics = {
            "loss": result.loss,
            "accuracy": result.accuracy,
            "train_seconds": result.seconds,
            **result.metrics,
        }
        return FitOutput(updated, result.num_examples, metrics)

    def evaluate(self, model: ModelSpec, weights: Weights) -> EvalOutput:
        self._wait_for_warm_up()
        net = self._model_for(model)
        set_weights(net, weights)
        result = self._eval_fn(net, self._eval_data, self._device)
        return EvalOutput(result.num_examples, {"loss": result.loss, "accuracy": result.accuracy})


class EchoTrainer(Trainer):
    """Trains nothing: ``fit`` returns the received weights unchanged (and uncopied).

    For protocol benchmarks and load tests, where only the transport is being measured.
    """

    @property
    def num_examples(self) -> int:
        return 1

    def fit(self, model: ModelSpec, weights: Weights, config: TrainConfig) -> FitOutput:
        return FitOutput(weights, 1)

    def evaluate(self, model: ModelSpec, weights: Weights) -> EvalOutput:
        return EvalOutput(1, {})
