"""The FedProx proximal term in the default training loop, against autograd on the explicit
objective ``loss(w) + mu/2 ||w - w0||^2`` (Li et al. 2020); the CPU fast layout."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch
from torch import nn

from fedcore.data import ArrayDataset, load_mnist
from fedcore.models import MnistCNN, build_model, get_weights
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.training import train


def _data(n: int = 16) -> ArrayDataset:
    rng = np.random.default_rng(0)
    return ArrayDataset(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n))


@pytest.mark.parametrize("mu", [0.0, 0.5, 5.0])
def test_proximal_term_matches_the_explicit_objective(mu: float) -> None:
    data = _data()
    config = TrainConfig(
        epochs=4, batch_size=len(data), learning_rate=0.5, extra={"proximal_mu": mu}
    )
    model = build_model(ModelSpec("logreg"), seed=1)
    reference = build_model(ModelSpec("logreg"), seed=1)
    anchors = [p.detach().clone() for p in reference.parameters()]
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    x, y = data.x, data.y
    for _ in range(config.epochs):  # full batch: the shuffle does not matter
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(reference(x), y)
        prox = sum(
            ((p - a) ** 2).sum() for p, a in zip(reference.parameters(), anchors, strict=True)
        )
        (loss + mu / 2 * prox).backward()  # type: ignore[no-untyped-call]  # torch: unannotated
        optimizer.step()
    train(model, data, config)
    for name, value in get_weights(model).items():
        np.testing.assert_allclose(value, get_weights(reference)[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_large_mu_keeps_the_model_near_the_global_one() -> None:
    data = _data()
    start = get_weights(build_model(ModelSpec("logreg"), seed=1))

    def drift(mu: float) -> float:
        model = build_model(ModelSpec("logreg"), seed=1)
        train(
            model,
            data,
            TrainConfig(epochs=5, batch_size=4, learning_rate=0.1, extra={"proximal_mu": mu}),
        )
        return sum(float(np.sum((w - start[k]) ** 2)) for k, w in get_weights(model).items())

    assert drift(5.0) < 0.5 * drift(0.0)


@pytest.mark.slow
def test_fast_layout_changes_speed_not_results() -> None:
    """Channels-last training and evaluation give the weights and metrics of the default layout
    (up to float rounding), and get_weights still returns contiguous arrays."""
    import fedcore.training as training

    x, y = load_mnist("train")
    data = ArrayDataset(x[:256], y[:256])
    config = TrainConfig(batch_size=32, learning_rate=0.05, seed=3)
    results = {}
    for layout in ("channels_last", "default"):
        torch.manual_seed(0)
        model = build_model(ModelSpec("mnist-cnn"))
        assert isinstance(model, MnistCNN)
        initial = get_weights(model)
        if layout == "default":
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(training, "fast_layout", lambda model, device: nullcontext())
                result = training.train(model, data, config)
                metrics = training.evaluate(model, data)
        else:
            # Spy: the convolution must see channels-last weights while training and evaluating.
            seen: list[bool] = []
            model.conv2.register_forward_pre_hook(  # conv1 (1 channel) fits both layouts
                lambda m, _, seen=seen: seen.append(
                    m.weight.is_contiguous(memory_format=torch.channels_last)
                )
            )
            result = training.train(model, data, config)
            metrics = training.evaluate(model, data)
            assert seen
            assert all(seen)
        # Either way the model is left in the default layout for whoever uses it next.
        assert model.conv2.weight.is_contiguous()
        weights = get_weights(model)
        assert all(w.flags["C_CONTIGUOUS"] for w in weights.values())
        delta = np.concatenate([(weights[k] - initial[k]).ravel() for k in weights])
        results[layout] = (result.loss, metrics.accuracy, delta)
    fast, default = results["channels_last"], results["default"]
    assert fast[0] == pytest.approx(default[0], rel=1e-4)
    assert fast[1] == pytest.approx(default[1], abs=1 / 256)
    # The updates agree up to float rounding, which 8 SGD steps amplify to ~1%; a layout bug
    # (weights read transposed, say) would give an unrelated update.
    assert np.linalg.norm(fast[2] - default[2]) < 0.02 * np.linalg.norm(default[2])


def test_fast_layout_is_channels_last_for_conv_models_on_the_cpu_only() -> None:
    import fedcore.training as training

    cpu = torch.device("cpu")
    model = build_model(ModelSpec("mnist-cnn"))
    assert isinstance(model, MnistCNN)
    with training.fast_layout(model, cpu) as layout:
        assert layout == torch.channels_last
        assert model.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.conv2.weight.is_contiguous()
    with training.fast_layout(build_model(ModelSpec("mnist-mlp")), cpu) as layout:
        assert layout is None
    with training.fast_layout(model, torch.device("meta")) as layout:
        assert layout is None
