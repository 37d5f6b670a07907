"""Record-level DP-SGD through Opacus: per-silo accounting, the silo budget, model checks."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

from fedcore.data.shards import ArrayDataset
from fedcore.errors import ConfigError, PrivacyBudgetExhausted
from fedcore.models import build_model
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.policy import load_policy
from fedcore.privacy.accountant import epsilon_of_history
from fedcore.privacy.dpsgd import DPSGD
from fedcore.worker import TorchTrainer


def _data(n: int = 256) -> ArrayDataset:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
    y = (x[:, :14].mean(axis=(1, 2)) > x[:, 14:].mean(axis=(1, 2))).astype(np.uint8)
    return ArrayDataset(x, y)


@pytest.mark.slow
def test_silo_reports_the_epsilon_of_its_steps(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="fedcore")
    loop = DPSGD(noise_multiplier=1.2, max_grad_norm=1.0, delta=1e-5, mechanism="rdp")
    trainer = TorchTrainer(_data(), train_fn=loop)
    config = TrainConfig(epochs=1, batch_size=64, learning_rate=0.1)
    first = trainer.fit(ModelSpec("logreg"), trainer_weights(), config)
    assert first.metrics["loss"] > 0
    eps1 = loop.epsilon
    trainer.fit(ModelSpec("logreg"), trainer_weights(), config)
    # 256 examples, batch 64: Poisson rate 1/4 and 4 steps per round, 8 after two rounds.
    opacus = RDPAccountant()
    opacus.history = [(1.2, 0.25, 8)]
    assert loop.accountant.history == [(1.2, 0.25, 8)]
    # The unit is one record replaced (silo sizes are public): above Opacus' add/remove figure.
    assert loop.epsilon == epsilon_of_history(
        [(1.2, 0.25, 8)], delta=1e-5, mechanism="rdp", relation="replace-one"
    )
    assert loop.epsilon > 1.5 * opacus.get_epsilon(delta=1e-5)
    assert loop.epsilon > eps1
    assert loop.metrics() == {"dpsgd_epsilon": loop.epsilon, "dpsgd_delta": 1e-5}
    # The silo logs its own epsilon every round, with or without a policy.
    logged = [r.getMessage() for r in caplog.records if "DP-SGD: 4 steps" in r.getMessage()]
    assert len(logged) == 2
    assert f"at epsilon {loop.epsilon:.3f} (delta 1e-05)" in logged[-1]
    # By default the silo reports the tighter of RDP and PLD for the same history.
    best = DPSGD(noise_multiplier=1.2, max_grad_norm=1.0, delta=1e-5)
    best.accountant.load_state_dict(loop.accountant.state_dict())
    assert best.epsilon < loop.epsilon
    assert best.epsilon == epsilon_of_history(
        [(1.2, 0.25, 8)], delta=1e-5, mechanism="pld", relation="replace-one"
    )


def trainer_weights() -> dict[str, np.ndarray]:
    model = build_model(ModelSpec("logreg"), seed=0)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_silo_budget_refuses_a_round_that_would_exceed_it() -> None:
    loop = DPSGD(noise_multiplier=2.0, max_grad_norm=1.0, max_epsilon=3.0, mechanism="pld")
    model = build_model(ModelSpec("logreg"), seed=0)
    config = TrainConfig(epochs=1, batch_size=64)
    # How many 4-step rounds fit in epsilon 3 for one record replaced (Opacus' add/remove
    # accountant would admit 4).
    expected = 0
    while True:
        history = [(2.0, 0.25, 4 * (expected + 1))]
        spent = epsilon_of_history(history, delta=1e-5, mechanism="pld", relation="replace-one")
        if spent > 3.0:
            break
        expected += 1
    reference = RDPAccountant()
    reference.history = [(2.0, 0.25, 4 * (expected + 1))]
    assert reference.get_epsilon(delta=1e-5) <= 3.0
    assert expected == 2
    for _ in range(expected):
        loop(model, _data(), config, torch.device("cpu"))
    with pytest.raises(PrivacyBudgetExhausted, match="silo"):
        loop(model, _data(), config, torch.device("cpu"))
    assert loop.epsilon <= 3.0


def test_batchnorm_is_refused_with_advice() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.BatchNorm1d(10))
    loop = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="GroupNorm"):
        loop(model, _data(), TrainConfig(batch_size=64), torch.device("cpu"))


def test_secure_mode_without_torchcsprng_is_refused_not_faked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "torchcsprng", None)  # not importable, whatever is installed
    with pytest.raises(ConfigError, match="torchcsprng"):
        DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, secure_mode=True)
    DPSGD(noise_multiplier=1.0, max_grad_norm=1.0)  # positive control: the default still starts


def test_secure_mode_draws_from_the_csprng_and_uses_opacus_secure_noise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The wiring, with a stand-in for torchcsprng's generator (no build exists for this
    torch): batches and noise come from it, and Opacus draws its noise in secure mode."""
    from opacus.optimizers import optimizer as opacus_optimizer

    devices: list[str] = []

    def create_random_device_generator(device: str) -> torch.Generator:
        devices.append(device)
        return torch.Generator().manual_seed(0)

    fake = types.ModuleType("torchcsprng")
    fake.create_random_device_generator = create_random_device_generator  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchcsprng", fake)
    calls: list[dict[str, Any]] = []
    real = opacus_optimizer._generate_noise

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(kwargs)
        noise: torch.Tensor = real(*args, **kwargs)  # opacus is untyped
        return noise

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", spy)
    loop = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, secure_mode=True, mechanism="rdp")
    model = build_model(ModelSpec("logreg"), seed=0)
    loop(model, _data(64), TrainConfig(epochs=1, batch_size=32), torch.device("cpu"))
    assert devices == ["/dev/urandom"]
    assert calls
    assert all(c["secure_mode"] is True for c in calls)
    assert all(isinstance(c["generator"], torch.Generator) for c in calls)


def test_policy_requires_secure_mode_and_the_worker_refuses_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedcore.worker.cli import main

    policy = tmp_path / "policy.toml"
    policy.write_text("[differential-privacy]\ndpsgd-secure-mode = true\n")
    assert load_policy(policy).privacy.dpsgd_secure_mode
    assert "DP-SGD in Opacus' secure mode" in load_policy(policy).describe()
    monkeypatch.setitem(sys.modules, "torchcsprng", None)
    argv = ["--server", "127.0.0.1:1", "--data", str(tmp_path / "none.npz")]
    dpsgd = ["--dpsgd-noise-multiplier", "1.0", "--policy", str(policy)]
    assert main([*argv, *dpsgd]) != 0
    assert "dpsgd-secure-mode" in capsys.readouterr().err
