"""The model registry: models are named, never shipped as code.

Both sides build a model from a :class:`~fedcore.plan.ModelSpec`: a registered name such as
``"mnist-cnn"`` or an import path ``"package.module:factory"`` for a user's own model, plus
JSON hyper-parameters passed to the factory as keyword arguments. The coordinator trusts its
own configuration; a worker builds only what :class:`fedcore.model_catalog.ModelCatalog`
admits: a registered name, or the one import path its data owner configured locally.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from fedcore.errors import ModelError
from fedcore.plan import ModelSpec
from fedcore.weights import Weights, check_signature, signature_of

__all__ = [
    "LogisticRegression",
    "MnistCNN",
    "MnistDPCNN",
    "MnistMLP",
    "ModelFactory",
    "ParameterVector",
    "available_models",
    "build_model",
    "get_weights",
    "import_factory",
    "instantiate",
    "register_model",
    "registered_factory",
    "set_weights",
]

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)
_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Decorator registering a model factory under ``name``."""

    def decorate(factory: F) -> F:
        if name in _REGISTRY:
            raise ModelError(f"model name {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_models() -> list[str]:
    """Names of the registered models."""
    return sorted(_REGISTRY)


def registered_factory(name: str) -> ModelFactory | None:
    """The factory registered under ``name``, or None."""
    return _REGISTRY.get(name)


def import_from_cwd() -> None:
    """Make the current folder importable, as ``python -m`` does: a user's own model package
    (``mypkg.models:make_model``) is found where the command runs, without ``PYTHONPATH``.
    For the commands that build a model on the user's own machine to export it (``fed-plan
    export``, ``fed-server --ship-plan``), never for a worker."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def import_factory(path: str) -> ModelFactory:
    """Import ``package.module:factory``. Only for paths configured on this machine (a
    coordinator's or a worker's own ``--model``): never for a name that arrived over the
    network (see :class:`fedcore.model_catalog.ModelCatalog`)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"{path!r} is not an import path such as 'mypackage.models:make_model'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"cannot import module {module_name!r} for model {path!r}: {exc} (the current "
            "folder is importable only for fed-plan export and fed-server --ship-plan; "
            "otherwise install the package or set PYTHONPATH)"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"{path!r}: module {module_name!r} has no callable {attr!r}")
    return factory  # type: ignore[no-any-return]


def _resolve(name: str) -> ModelFactory:
    factory = registered_factory(name)
    if factory is not None:
        return factory
    if ":" not in name:
        raise ModelError(
            f"unknown model {name!r}; registered models: {', '.join(available_models())}; "
            "or give an import path such as 'mypackage.models:make_model'"
        )
    return import_factory(name)


def build_model(spec: ModelSpec, *, seed: int | None = None) -> nn.Module:
    """Instantiate ``spec`` (a registered name, or an import path trusted by the caller:
    this machine's own configuration); with ``seed``, initial weights are deterministic."""
    return instantiate(_resolve(spec.name), spec, seed=seed)


def instantiate(factory: ModelFactory, spec: ModelSpec, *, seed: int | None = None) -> nn.Module:
    """Call ``factory`` with ``spec``'s hyper-parameters and check it made a module."""
    try:
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = factory(**spec.params)
        else:
            model = factory(**spec.params)
    except TypeError as exc:
        raise ModelError(f"model {spec}: bad hyper-parameters: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model factory for {spec.name!r} returned {type(model).__name__}, not nn.Module"
        )
    return model


def get_weights(model: nn.Module, *, copy: bool = True) -> Weights:
    """The model's state as numpy arrays on the CPU, in state_dict order.

    With ``copy=False`` CPU tensors are shared, not copied: for a model about to be dropped.
    """
    return {
        name: tensor.detach().to("cpu", copy=copy).contiguous().numpy()
        for name, tensor in model.state_dict().items()
    }


def set_weights(model: nn.Module, weights: Weights) -> None:
    """Load ``weights`` into ``model`` after checking names, shapes and dtypes (in any order)."""
    current = model.state_dict()
    if len(weights) == len(current) and all(name in weights for name in current):
        weights = {name: weights[name] for name in current}
    check_signature(
        signature_of({k: v.detach().cpu().numpy() for k, v in current.items()}),
        signature_of(weights),
        context="received weights do not fit the local model",
    )
    with torch.no_grad():
        for name, tensor in current.items():
            tensor.copy_(torch.from_numpy(np.asarray(weights[name])))


# ------------------------------------------------------------------ built-in models


class MnistCNN(nn.Module):
    """The CNN of McMahan et al. 2017 ("Communication-Efficient Learning..."): 1,663,370 params.

    conv5x5(32) -> maxpool -> conv5x5(64) -> maxpool -> fc(512) -> fc(10), ReLU activations.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(7 * 7 * 64, 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)  # type: ignore[no-any-return]


class MnistMLP(nn.Module):
    """The 2NN of McMahan et al. 2017: 784-200-200-10 with ReLU (199,210 params)."""

    def __init__(self, hidden: int = 200, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


class MnistDPCNN(nn.Module):
    """The small tanh CNN of Papernot et al. (AAAI 2021, "Tempered Sigmoid Activations for Deep
    Learning with Differential Privacy") for DP-SGD on MNIST: 26,010 params, no BatchNorm.

    conv8x8(16, stride 2) -> maxpool2 -> conv4x4(32, stride 2) -> maxpool2 -> fc(32) -> fc(10).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=8, stride=2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=4, stride=2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.tanh(self.conv1(x)), 2, 1)
        x = nn.functional.max_pool2d(torch.tanh(self.conv2(x)), 2, 1)
        x = torch.tanh(self.fc1(x.flatten(1)))
        return self.fc2(x)  # type: ignore[no-any-return]


class LogisticRegression(nn.Module):
    """Multinomial logistic regression on flattened inputs."""

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))  # type: ignore[no-any-return]


class ParameterVector(nn.Module):
    """A flat vector of ``size`` float32 parameters and no computation: for protocol benchmarks."""

    def __init__(self, size: int = 100_000) -> None:
        super().__init__()
        if size < 1:
            raise ModelError(f"vector size must be positive, got {size}")
        self.weight = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _register_builtins() -> None:
    builtins: dict[str, Callable[..., Any]] = {
        "mnist-cnn": MnistCNN,
        "mnist-mlp": MnistMLP,
        "mnist-dpcnn": MnistDPCNN,
        "logreg": LogisticRegression,
        "vector": ParameterVector,
    }
    for name, factory in builtins.items():
        register_model(name)(factory)


_register_builtins()
