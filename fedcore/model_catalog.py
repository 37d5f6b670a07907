"""What a worker agrees to build: its registry, plus the one model its data owner configured.

A plan names a model; the name is a *request*, not code. :class:`ModelCatalog` admits a
registered name (``"mnist-cnn"``) or the import path the data owner gave this worker
(``fed-worker --model pkg.mod:factory``) and nothing else: an import path that arrives in a
plan is never imported (``os:system`` would otherwise run with the plan's JSON as keyword
arguments). With a configured model, the plan's hyper-parameters must be exactly the
configured ones.

:meth:`ModelCatalog.signature` computes a model's parameter names, shapes and dtypes on
torch's ``meta`` device: no memory is allocated, so a plan asking for ``mnist-cnn`` with
``num_classes=10**9`` is measured (and refused by the size limit) without building it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from fedcore.errors import ModelError
from fedcore.models import (
    ModelFactory,
    available_models,
    import_factory,
    instantiate,
    registered_factory,
)
from fedcore.plan import ModelSpec
from fedcore.weights import ModelSignature, TensorSignature

__all__ = ["ModelCatalog", "meta_signature"]

log = logging.getLogger("fedcore.models")


def meta_signature(factory: ModelFactory, spec: ModelSpec) -> ModelSignature:
    """``spec``'s state-dict signature, built on the ``meta`` device (shapes, no storage).

    Raises:
        ModelError: the factory rejects the hyper-parameters or fails on the meta device.
    """
    try:
        with torch.device("meta"):
            model = instantiate(factory, spec)
    except ModelError:
        raise
    except Exception as exc:  # a factory's own validation (ValueError, RuntimeError, ...)
        raise ModelError(f"model {spec}: cannot be built: {type(exc).__name__}: {exc}") from None
    return _signature_of_module(model)


def _signature_of_module(model: nn.Module) -> ModelSignature:
    out = []
    for name, tensor in model.state_dict().items():
        shape = tuple(int(d) for d in tensor.shape)
        out.append(TensorSignature(name, _numpy_dtype_name(tensor.dtype), shape))
    return tuple(out)


def _numpy_dtype_name(dtype: torch.dtype) -> str:
    names = {
        torch.float32: "float32",
        torch.float64: "float64",
        torch.float16: "float16",
        torch.bfloat16: "bfloat16",
        torch.int64: "int64",
        torch.int32: "int32",
        torch.int16: "int16",
        torch.int8: "int8",
        torch.uint8: "uint8",
        torch.bool: "bool",
    }
    name = names.get(dtype)
    if name is None:
        raise ModelError(f"parameters of dtype {dtype} cannot travel in fedcore payloads")
    return name


@dataclass
class ModelCatalog:
    """The models this worker builds.

    Args:
        configured: the model the data owner configured (``--model``/``--model-params``);
            when set, it is the only model accepted, hyper-parameters included.
    """

    configured: ModelSpec | None = None
    _signatures: dict[str, ModelSignature] = field(default_factory=dict, repr=False)

    def factory(self, spec: ModelSpec) -> ModelFactory:
        """The factory ``spec`` may be built with.

        Raises:
            ModelError: the name is neither registered nor this worker's configured model,
                or differs from the configured model (name or hyper-parameters).
        """
        configured = self.configured
        if configured is not None:
            if spec.name != configured.name:
                raise ModelError(
                    f"this worker runs model {configured.name}, the plan asks for {spec.name}"
                )
            if spec.params != configured.params:
                raise ModelError(
                    f"the plan's hyper-parameters for {spec.name} ({spec}) differ from this "
                    f"worker's --model-params ({configured})"
                )
        factory = registered_factory(spec.name)
        if factory is not None:
            return factory
        if configured is not None and spec.name == configured.name:
            return import_factory(spec.name)
        raise ModelError(
            f"the plan names model {spec.name!r}, which is not registered on this worker "
            f"({', '.join(available_models())}); a model outside the registry runs only when "
            "the data owner configures it here (fed-worker --model pkg.module:factory)"
        )

    def signature(self, spec: ModelSpec) -> ModelSignature:
        """``spec``'s parameter signature, computed without allocating (cached per spec)."""
        key = str(ModelSpec(spec.name, spec.params).to_proto())
        cached = self._signatures.get(key)
        if cached is None:
            cached = meta_signature(self.factory(spec), spec)
            if len(self._signatures) > 64:  # a coordinator cannot grow it without bound
                self._signatures.clear()
            self._signatures[key] = cached
        return cached

    def build(self, spec: ModelSpec, *, seed: int | None = None) -> nn.Module:
        """Build ``spec`` for real (after :meth:`signature` said it fits)."""
        return instantiate(self.factory(spec), spec, seed=seed)
