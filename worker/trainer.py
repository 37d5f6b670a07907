"""What a worker runs: the :class:`Trainer` interface and the default PyTorch implementation.

Plug in any ``torch.utils.data.Dataset`` and, optionally, your own training or evaluation
loop::

    def my_loop(model, dataset, config, device) -> fedcore.training.TrainResult: ...

    trainer = TorchTrainer(my_dataset, train_fn=my_loop)
    await Worker("coordinator:50051", "hospital-a", trainer).run()
"""

from __future__ import annotations

import contextlib
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from fedcore.data.shards import ArrayDataset
from fedcore.errors import ConfigError, ModelError, ModelMismatchError, TrainingFailed
from fedcore.fit_check import check_data_fits
from fedcore.model_catalog import ModelCatalog
from fedcore.models import get_weights, set_weights
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.privacy import ClientDP
from fedcore.privacy.dpsgd import DPSGD
from fedcore.training import Batch, EvalResult, TrainResult, evaluate, train, warm_up
from fedcore.weights import ModelSignature, Weights, signature_of

from .plans import PlanLibrary, PlanState
from .sandbox import PlanSandbox, SandboxLimits

log = logging.getLogger("fedcore.worker")

__all__ = ["EchoTrainer", "EvalOutput", "FitOutput", "TorchTrainer", "Trainer", "TrainingFailed"]


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
    """Runs plans on local data. Methods are called from a worker thread, one at a time,
    unless the trainer declares ``concurrent`` (then the tasks of up to ``[jobs] max-tasks``
    jobs train at once, each in its own thread)."""

    #: Whether ``fit`` and ``evaluate`` may run for several tasks at once.
    concurrent: bool = False

    @property
    @abstractmethod
    def num_examples(self) -> int:
        """Size of the local training set (advertised in the hello)."""

    def announced_model(self) -> tuple[ModelSpec, ModelSignature] | None:
        """The model this trainer was set up for, if any: checked by the coordinator at join."""
        return None

    def check_data(self, model: ModelSpec) -> None:
        """Raise :class:`~fedcore.errors.DataError` when the local data cannot fit ``model``
        (called once the federation's model is known, before any task). Default: no check."""
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


def _divergence_hint(config: TrainConfig, train_fn: TrainFn) -> str:
    """The likely cause of weights that turned NaN/Inf, and what to change. Noise is named
    first when the plan or this worker adds it: a smaller learning rate does not help there."""
    client_dp = ClientDP.from_extra(config.extra)
    if client_dp is not None and client_dp.noise_multiplier:
        return (
            f"the likely cause is the federation's DP noise (noise multiplier "
            f"{client_dp.noise_multiplier:g}, clip norm {client_dp.clip_norm:g}), which the "
            "global model carries: lower fed-server --dp-noise-multiplier or run with more "
            "workers, then lower --lr"
        )
    if isinstance(train_fn, DPSGD):
        return (
            f"the likely cause is DP-SGD's gradient noise (noise multiplier "
            f"{train_fn.noise_multiplier:g}): raise --batch-size (less noise per example) or "
            f"lower --lr (now {config.learning_rate:g}) or --dpsgd-noise-multiplier"
        )
    return f"lower the learning rate (--lr, now {config.learning_rate:g})"


def _tensors(data: Dataset[Batch]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (x, y) tensors of a dataset held in memory (as fedcore's ArrayDataset is)."""
    x, y = getattr(data, "x", None), getattr(data, "y", None)
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and len(x) == len(y):
        return x, y
    return None


def _describe(data: Dataset[Batch], role: str) -> str:
    return f"{role} {data.source}" if isinstance(data, ArrayDataset) else role


class TorchTrainer(Trainer):
    """Trains registered (or user) PyTorch models on a local dataset; concurrent tasks each
    train their own copy of the model (``train_fn`` and ``eval_fn`` must allow it).

    Args:
        train_data: the local training set.
        eval_data: local test set for federated evaluation (default: the training set).
        model: when given, the only model this worker accepts; announced at join.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        train_fn / eval_fn: replace the default loops.
        plans: the verified plans this worker runs (shipped models; see worker/plans.py).
            With its policy's ``[plans] sandbox`` (the default), plans train and evaluate in
            a limited child process (worker/sandbox.py) when the data is held in memory, the
            device is the CPU and the loops are the default ones; otherwise in this process.
    """

    concurrent = True

    def __init__(
        self,
        train_data: Dataset[Batch],
        *,
        eval_data: Dataset[Batch] | None = None,
        model: ModelSpec | None = None,
        device: str = "cpu",
        train_fn: TrainFn = _default_train,
        eval_fn: EvalFn = _default_eval,
        plans: PlanLibrary | None = None,
    ) -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {device} asked for, but torch sees no CUDA device")
        self._train_data = train_data
        self._eval_data = eval_data if eval_data is not None else train_data
        self._device = torch.device(device)
        self._train_fn = train_fn
        self._eval_fn = eval_fn
        # Only registered models, or the one the data owner configured (the gate has already
        # refused anything else; this holds for trainers driven without it, too).
        self._catalog = ModelCatalog(model)
        self._plans = plans
        self._sandbox = self._make_sandbox(plans, device, train_fn, eval_fn)
        self._cached: tuple[ModelSpec, nn.Module] | None = None
        # The parameters the model's factory left trainable (peft freezes a base model): what
        # a task that names no trainable parameters trains.
        self._factory_trainable: frozenset[str] = frozenset()
        # Tasks of different jobs may train at once ([jobs] max-tasks): one of them uses the
        # cached model, the others a copy of their own, dropped when their task ends.
        self._lease_lock = threading.Lock()
        self._cached_lent = False
        self._announced: tuple[ModelSpec, ModelSignature] | None = None
        self._checked: ModelSpec | None = None
        if model is not None:
            self._announced = (model, signature_of(get_weights(self._model_for(model))))
            self._check_data(model)  # before the warm-up thread starts importing
        # Torch's one-time imports run while the worker connects (see training.warm_up). Not a
        # daemon: a worker that ends early (federation over, a refusal) waits for it at exit,
        # because an interpreter torn down under a thread inside torch's imports aborts the
        # process ("terminate called without an active exception", exit -6).
        self._warm = threading.Thread(target=warm_up, name="fedcore-warm-up")
        self._warm.start()

    def _make_sandbox(
        self, plans: PlanLibrary | None, device: str, train_fn: TrainFn, eval_fn: EvalFn
    ) -> PlanSandbox | None:
        if plans is None or not plans.rules.sandbox:
            return None
        train_tensors = _tensors(self._train_data)
        eval_tensors = _tensors(self._eval_data)
        own_loops = train_fn is not _default_train or eval_fn is not _default_eval
        if train_tensors is None or eval_tensors is None or device != "cpu" or own_loops:
            log.warning(
                "plans run in this process, not in a sandbox: it needs in-memory data, the "
                "CPU and the default training loops"
            )
            return None
        limits = SandboxLimits(plans.rules.sandbox_memory_bytes, plans.rules.sandbox_cpu_seconds)
        same = self._eval_data is self._train_data
        return PlanSandbox(
            limits, train_tensors, None if same else eval_tensors, plans.rules.accept_buffers
        )

    @property
    def num_examples(self) -> int:
        return len(self._train_data)  # type: ignore[arg-type]

    def announced_model(self) -> tuple[ModelSpec, ModelSignature] | None:
        return self._announced

    def _build(self, spec: ModelSpec) -> nn.Module:
        model = self._plans.build(spec) if self._plans is not None else None
        try:
            model = model if model is not None else self._catalog.build(spec)
        except ModelError as exc:
            raise ModelMismatchError(str(exc)) from None
        return model.to(self._device)

    def _model_for(self, spec: ModelSpec) -> nn.Module:
        if self._cached is None or self._cached[0] != spec:
            model = self._build(spec)
            self._cached = (spec, model)
            self._factory_trainable = frozenset(
                name for name, p in model.named_parameters() if p.requires_grad
            )
        return self._cached[1]

    @contextlib.contextmanager
    def _leased(self, spec: ModelSpec) -> Iterator[tuple[nn.Module, frozenset[str]]]:
        """A model of ``spec`` no other task uses meanwhile, and its factory's trainable
        parameters: the cached one when free, else a fresh copy."""
        with self._lease_lock:
            shared = not self._cached_lent
            if shared:
                net, trainable = self._model_for(spec), self._factory_trainable
                self._cached_lent = True
        if not shared:
            net = self._build(spec)
            trainable = frozenset(name for name, p in net.named_parameters() if p.requires_grad)
        try:
            yield net, trainable
        finally:
            if shared:
                with self._lease_lock:
                    self._cached_lent = False

    def check_data(self, model: ModelSpec) -> None:
        """The training and evaluation sets must fit ``model`` (a model this worker's catalog
        refuses raises :class:`~fedcore.errors.ModelMismatchError`, as its plans would).

        It does not wait for the warm-up thread: a forward pass without gradients imports
        none of the optimizer stack the warm-up loads, and waiting here would hold the
        worker's first task for the seconds the warm-up takes on a busy machine."""
        self._check_data(model)

    def _check_data(self, model: ModelSpec) -> None:
        if model == self._checked:
            return
        net = self._model_for(model)
        check_data_fits(
            net, self._train_data, model_name=str(model), what=_describe(self._train_data, "shard")
        )
        if self._eval_data is not self._train_data:
            what = _describe(self._eval_data, "evaluation data")
            check_data_fits(net, self._eval_data, model_name=str(model), what=what)
        self._checked = model

    def _wait_for_warm_up(self) -> None:
        # Never import the same modules from two threads at once.
        self._warm.join(timeout=600)

    def _load(self, net: nn.Module, model: ModelSpec, weights: Weights) -> nn.Module:
        """``net`` with ``weights`` loaded; a plan's constants as shipped (nothing a graph
        wrote in an earlier task is kept)."""
        set_weights(net, weights)
        state = self._plans.state(model) if self._plans is not None else None
        if state is not None:
            state.reset(net)
        return net

    def _sandboxed(self, model: ModelSpec) -> tuple[PlanSandbox, PlanState] | None:
        if self._sandbox is None or self._plans is None:
            return None
        state = self._plans.state(model)
        return None if state is None else (self._sandbox, state)

    def _fit_sandboxed(
        self,
        sandbox: PlanSandbox,
        state: PlanState,
        model: ModelSpec,
        weights: Weights,
        config: TrainConfig,
    ) -> FitOutput:
        assert self._plans is not None
        verified = self._plans.verified(model)
        assert verified is not None  # state() found it
        result = sandbox.run(verified.program, weights, config, verified.signature)
        metrics = dict(result.metrics)
        return FitOutput(state.upload(result.weights, weights), result.num_examples, metrics)

    def fit(self, model: ModelSpec, weights: Weights, config: TrainConfig) -> FitOutput:
        self._wait_for_warm_up()
        sandboxed = self._sandboxed(model)
        if sandboxed is not None:
            return self._fit_sandboxed(*sandboxed, model, weights, config)
        with self._leased(model) as (net, factory_trainable):
            self._load(net, model, weights)
            # Frozen parameters get no gradient, so no optimizer step or weight decay moves
            # them. Set for every task: the model outlives it, and the next may train others.
            keep = set(config.trainable) if config.trainable else factory_trainable
            for name, parameter in net.named_parameters():
                parameter.requires_grad_(name in keep)
            result = self._train_fn(net, self._train_data, config, self._device)
            updated = get_weights(net)
        state = self._plans.state(model) if self._plans is not None else None
        if state is not None:  # only what the data owner accepted leaves
            updated = state.upload(updated, weights)
        for name, array in updated.items():
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise TrainingFailed(
                    f"training produced NaN/Inf in {name!r} (loss {result.loss:.4g}); "
                    f"{_divergence_hint(config, self._train_fn)}"
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
        sandboxed = self._sandboxed(model)
        if sandboxed is not None:
            verified = self._plans.verified(model) if self._plans is not None else None
            assert verified is not None
            ran = sandboxed[0].run(verified.program, weights, None, verified.signature)
            return EvalOutput(ran.num_examples, ran.metrics)
        with self._leased(model) as (net, _):
            result = self._eval_fn(self._load(net, model, weights), self._eval_data, self._device)
        return EvalOutput(result.num_examples, {"loss": result.loss, "accuracy": result.accuracy})


class EchoTrainer(Trainer):
    """Trains nothing: ``fit`` returns the received weights unchanged (and uncopied), or with
    ``step`` added to every float (a copy): the global model then changes every round, as
    secure aggregation's once-per-model rule requires of a federation that runs several.

    For protocol benchmarks and load tests, where only the transport is being measured.
    """

    concurrent = True

    def __init__(self, step: float = 0.0) -> None:
        self.step = step

    @property
    def num_examples(self) -> int:
        return 1

    def fit(self, model: ModelSpec, weights: Weights, config: TrainConfig) -> FitOutput:
        if not self.step:
            return FitOutput(weights, 1)
        # A Python float keeps each array's dtype (NumPy 2 promotion).
        moved = {n: np.add(a, self.step) if a.dtype.kind == "f" else a for n, a in weights.items()}
        return FitOutput(moved, 1)

    def evaluate(self, model: ModelSpec, weights: Weights) -> EvalOutput:
        return EvalOutput(1, {})
