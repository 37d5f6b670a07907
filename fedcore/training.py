"""Local training and evaluation loops (PyTorch), used by the default worker trainer and by the
coordinator's centralized evaluation.

Datasets that expose in-memory ``x`` and ``y`` tensors (such as
:class:`fedcore.data.ArrayDataset`) are batched by index, which is several times faster than a
``DataLoader`` for small images; any other ``torch.utils.data.Dataset`` goes through a
``DataLoader``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedcore.losses import loss_function, loss_of
from fedcore.plan import PROXIMAL_MU, TrainConfig

__all__ = [
    "EvalResult",
    "TrainResult",
    "evaluate",
    "fast_layout",
    "iter_batches",
    "make_optimizer",
    "train",
    "warm_up",
]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrainResult:
    """What a local training run reports."""

    num_examples: int
    loss: float
    accuracy: float
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)  # extra, e.g. a silo's epsilon


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracy over a dataset."""

    num_examples: int
    loss: float
    accuracy: float


def _in_memory(dataset: Dataset[Batch]) -> tuple[torch.Tensor, torch.Tensor] | None:
    x = getattr(dataset, "x", None)
    y = getattr(dataset, "y", None)
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and len(x) == len(y):
        return x, y
    return None


def iter_batches(
    dataset: Dataset[Batch], batch_size: int, *, shuffle: bool, generator: torch.Generator | None
) -> Iterator[Batch]:
    """Yield (inputs, targets) batches of ``dataset``."""
    tensors = _in_memory(dataset)
    if tensors is None:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)
        yield from loader
        return
    x, y = tensors
    n = len(x)
    order = torch.randperm(n, generator=generator) if shuffle else None
    for start in range(0, n, batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]


@contextlib.contextmanager
def fast_layout(model: nn.Module, device: torch.device) -> Iterator[torch.memory_format | None]:
    """Run a convolutional model in channels-last layout on the CPU; yield that format.

    oneDNN's CPU convolutions and max-pooling are markedly faster on channels-last (NHWC)
    tensors (mnist-cnn: about 10% per training step and a quarter off evaluation on one
    thread). Only the memory layout changes: shapes, names and the maths are the same. The
    model is put back in the default layout on exit, so code that reuses it (a DP-SGD
    wrapper, a user's own loop) never meets an unexpected layout. Yields None, leaving the
    model alone, off the CPU or without ``Conv2d`` layers (a plan's module, which has no
    layers, declares ``convolutional`` itself).
    """
    convolutional = bool(getattr(model, "convolutional", False)) or any(
        isinstance(m, nn.Conv2d) for m in model.modules()
    )
    if device.type != "cpu" or not convolutional:
        yield None
        return
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    try:
        yield torch.channels_last
    finally:
        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]


def _to_layout(inputs: torch.Tensor, layout: torch.memory_format | None) -> torch.Tensor:
    if layout is None or inputs.dim() != 4:
        return inputs
    return inputs.contiguous(memory_format=layout)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer a plan asks for."""
    if config.optimizer == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
    return torch.optim.SGD(
        model.parameters(),
        lr=config.learning_rate,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


#: Held while a thread pays one of torch's lazy imports of its compiler stack: two threads
#: importing torch._dynamo at once can see a partially initialised module (the worker's
#: warm-up thread and its gate, which rebuilds plans: fedcore.plans.rebuild).
TORCH_IMPORTS = threading.RLock()


def warm_up() -> None:
    """Pay torch's one-time costs now: its first optimizer imports the compiler stack lazily
    (800+ modules; seconds, tens of seconds on a busy machine). A worker runs this while it
    connects and waits for its first task, so round 1 does not pay for it."""
    with TORCH_IMPORTS:
        weight = nn.Parameter(torch.zeros(2, 2))
        optimizer = torch.optim.SGD([weight], lr=0.1)
        loss: torch.Tensor = (weight * weight).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()


def train(
    model: nn.Module,
    dataset: Dataset[Batch],
    config: TrainConfig,
    *,
    device: torch.device | str = "cpu",
) -> TrainResult:
    """Train ``model`` in place for ``config.epochs`` epochs with cross-entropy loss (or the
    loss the model declares: a plan's, see :mod:`fedcore.losses`).

    With ``config.extra["proximal_mu"] = mu > 0`` (FedProx, Li et al. 2020) the objective is
    ``loss(w) + mu/2 ||w - w0||^2`` with ``w0`` the weights training started from; the
    term's gradient ``mu (w - w0)`` is added to every parameter's gradient. The reported
    loss is the data loss alone.
    """
    device = torch.device(device)
    model.to(device)
    with fast_layout(model, device) as layout:
        return _train_epochs(model, dataset, config, device, layout)


def _train_epochs(
    model: nn.Module,
    dataset: Dataset[Batch],
    config: TrainConfig,
    device: torch.device,
    layout: torch.memory_format | None,
) -> TrainResult:
    model.train()
    optimizer = make_optimizer(model, config)
    mu = float(config.extra.get(PROXIMAL_MU, 0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if mu > 0 else []
    generator = torch.Generator().manual_seed(config.seed)
    loss_fn = loss_function(loss_of(model))
    started = time.perf_counter()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    for _ in range(config.epochs):
        for inputs, targets in iter_batches(
            dataset, config.batch_size, shuffle=True, generator=generator
        ):
            inputs = _to_layout(inputs.to(device, non_blocking=True), layout)
            targets = targets.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            logits = model(inputs)
            loss = loss_fn(logits, targets)
            loss.backward()  # type: ignore[no-untyped-call]
            if anchors:
                with torch.no_grad():
                    for p, p0 in zip(params, anchors, strict=True):
                        if p.grad is not None:
                            p.grad.add_(p - p0, alpha=mu)
            optimizer.step()
            # Accumulate on the device; one sync at the end instead of one per batch.
            total_loss += loss.detach() * len(targets)
            correct += (logits.detach().argmax(1) == targets).sum()
            seen += len(targets)
    if seen == 0:
        return TrainResult(0, float("nan"), float("nan"), time.perf_counter() - started)
    return TrainResult(
        num_examples=len(dataset),  # type: ignore[arg-type]
        loss=float(total_loss) / seen,
        accuracy=int(correct) / seen,
        seconds=time.perf_counter() - started,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset[Batch],
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Mean loss (cross-entropy, or the model's declared loss) and accuracy on ``dataset``."""
    device = torch.device(device)
    model.to(device)
    with fast_layout(model, device) as layout:
        return _evaluate_batches(model, dataset, batch_size, device, layout)


def _evaluate_batches(
    model: nn.Module,
    dataset: Dataset[Batch],
    batch_size: int,
    device: torch.device,
    layout: torch.memory_format | None,
) -> EvalResult:
    model.eval()
    loss_fn = loss_function(loss_of(model), reduction="sum")
    total_loss = 0.0
    correct = 0
    seen = 0
    for inputs, targets in iter_batches(dataset, batch_size, shuffle=False, generator=None):
        inputs, targets = _to_layout(inputs.to(device), layout), targets.to(device)
        logits = model(inputs)
        total_loss += float(loss_fn(logits, targets))
        correct += int((logits.argmax(1) == targets).sum())
        seen += len(targets)
    if seen == 0:
        return EvalResult(0, float("nan"), float("nan"))
    return EvalResult(seen, total_loss / seen, correct / seen)
