"""The model registry and the built-in models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedcore.models as models_module
from fedcore.errors import ModelError, ModelMismatchError
from fedcore.models import (
    LogisticRegression,
    build_model,
    get_weights,
    register_model,
    set_weights,
)
from fedcore.plan import ModelSpec
from fedcore.weights import num_parameters, signature_of


@pytest.mark.parametrize(
    ("name", "params", "count"),
    [
        ("mnist-cnn", {}, 1_663_370),
        ("mnist-mlp", {}, 199_210),
        ("logreg", {}, 7_850),
        ("vector", {"size": 123}, 123),
    ],
)
def test_builtin_parameter_counts(name: str, params: dict[str, int], count: int) -> None:
    model = build_model(ModelSpec(name, params))
    assert num_parameters(signature_of(get_weights(model))) == count
    if name != "vector":
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_seeded_builds_are_identical_and_do_not_touch_global_rng() -> None:
    state = torch.random.get_rng_state()
    a = get_weights(build_model(ModelSpec("mnist-mlp"), seed=3))
    b = get_weights(build_model(ModelSpec("mnist-mlp"), seed=3))
    assert torch.equal(torch.random.get_rng_state(), state)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_import_path_models_and_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    # The registry is process-wide: this test's model must not outlive it (test_docs checks
    # that every registered model is documented, in whatever process runs after this one).
    monkeypatch.setattr(models_module, "_REGISTRY", dict(models_module._REGISTRY))
    model = build_model(ModelSpec("torch.nn:Linear", {"in_features": 3, "out_features": 2}))
    assert isinstance(model, torch.nn.Linear)

    @register_model("test-tiny")
    def tiny() -> torch.nn.Module:
        return torch.nn.Linear(1, 1)

    assert isinstance(build_model(ModelSpec("test-tiny")), torch.nn.Linear)
    with pytest.raises(ModelError, match="already registered"):
        register_model("test-tiny")(tiny)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ModelSpec("no-such-model"), "unknown model 'no-such-model'; registered models:"),
        (ModelSpec("no_such_module_xyz:f"), "cannot import module"),
        (ModelSpec("torch.nn:NotThere"), "no callable 'NotThere'"),
        (ModelSpec("mnist-mlp", {"bogus": 1}), "bad hyper-parameters"),
    ],
)
def test_bad_model_specs_explain_themselves(spec: ModelSpec, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build_model(spec)


def test_set_weights_refuses_mismatched_shapes() -> None:
    model = build_model(ModelSpec("logreg"))
    assert isinstance(model, LogisticRegression)
    weights = get_weights(build_model(ModelSpec("logreg", {"num_classes": 5})))
    with pytest.raises(ModelMismatchError, match=r"'linear.weight' is float32\[5, 784\]"):
        set_weights(model, weights)
    good = {k: np.full_like(v, 0.5) for k, v in get_weights(model).items()}
    set_weights(model, good)
    assert float(model.linear.bias[0].detach()) == 0.5
