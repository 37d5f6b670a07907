"""The worker's gate, in process: model admission and sizing, bounds, releases, secagg rules,
and a custom model configured on both sides (fed-server --model / fed-worker --model)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hostile import crafted_eval_weights, evaluate_task, fit_task
from test_coordinator import TIMEOUT, config

from fedcore.codec import make_header
from fedcore.data import ArrayDataset
from fedcore.errors import ModelError, PolicyError, TaskRefused
from fedcore.model_catalog import ModelCatalog
from fedcore.models import build_model, get_weights
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.policy import load_policy
from fedcore.privacy import privatize_update
from fedcore.privacy.dpsgd import DPSGD
from fedcore.secagg import wire
from fedcore.secagg.messages import RoundSetup
from fedcore.secagg.quantize import FixedPoint
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights, total_bytes
from fedcore.worker import EvalOutput, FitOutput, Gate, PolicyGuard, TorchTrainer, Worker

LOGREG = get_weights(build_model(ModelSpec("logreg"), seed=0))


def _with_weights(task: pb.Task, weights: Weights) -> pb.Task:
    task.weights.CopyFrom(make_header(weights, 1 << 16))
    return task


def _gate(policy_text: str | None = None, tmp_path: Path | None = None, **kw: Any) -> Gate:
    guard = None
    if policy_text is not None:
        assert tmp_path is not None
        path = tmp_path / "policy.toml"
        path.write_text(policy_text)
        guard = PolicyGuard(load_policy(path), num_examples=400)
    return Gate(kw.pop("catalog", ModelCatalog()), max_model_bytes=1 << 26, guard=guard, **kw)


def test_an_honest_fit_is_admitted_as_a_typed_task() -> None:
    checked = _gate().admit(_with_weights(fit_task(learning_rate=0.05), LOGREG))
    assert checked.kind == "fit"
    assert checked.model == ModelSpec("logreg")
    assert checked.train == TrainConfig(epochs=1, batch_size=64, learning_rate=0.05)
    assert checked.dp is None
    assert checked.secagg is None


def test_an_import_path_from_the_plan_is_never_imported(tmp_path: Path) -> None:
    marker = tmp_path / "x"
    task = _with_weights(fit_task("os:system", {"command": f"touch {marker}"}), LOGREG)
    with pytest.raises(TaskRefused, match=r"\[model.allowed\].*not registered"):
        _gate().admit(task)
    assert not marker.exists()
    with pytest.raises(ModelError, match="not registered"):
        ModelCatalog().build(ModelSpec("os:system", {"command": f"touch {marker}"}))
    assert not marker.exists()


def test_the_configured_import_path_and_only_its_params_are_accepted() -> None:
    mine = ModelSpec("custom_model:make", {"hidden": 4})
    catalog = ModelCatalog(mine)
    weights = get_weights(catalog.build(mine))
    gate = _gate(catalog=catalog)
    assert gate.admit(_with_weights(fit_task("custom_model:make", {"hidden": 4}), weights))
    with pytest.raises(TaskRefused, match=r"\[model.allowed\].*differ from this worker's"):
        gate.admit(_with_weights(fit_task("custom_model:make", {"hidden": 5}), weights))
    with pytest.raises(TaskRefused, match=r"\[model.allowed\].*runs model custom_model:make"):
        gate.admit(_with_weights(fit_task("logreg"), LOGREG))


def test_model_size_is_measured_on_the_meta_device_before_anything_is_built() -> None:
    spec = ModelSpec("mnist-cnn", {"num_classes": 10**9})
    started = time.perf_counter()
    signature = ModelCatalog().signature(spec)
    assert time.perf_counter() - started < 5  # 2 TB were never allocated, let alone filled
    assert total_bytes(signature) > 2 * 10**12
    with pytest.raises(TaskRefused, match=r"\[model.max-bytes\]"):
        _gate().admit(_with_weights(fit_task("mnist-cnn", {"num_classes": 10**9}), LOGREG))


@pytest.mark.parametrize(
    ("train", "rule"),
    [
        ({"learning_rate": 1e-30}, "training.learning-rate"),
        ({"learning_rate": 11.0}, "training.learning-rate"),
        ({"learning_rate": 0.0}, "training.config"),
        ({"epochs": 101}, "training.max-epochs"),
        ({"batch_size": 65_537}, "training.max-batch-size"),
        ({"momentum": 1.0}, "training.momentum"),
        ({"extra": {"proximal_mu": math.inf}}, "training.extra"),
        ({"extra": {"dp.clip_norm": -1.0}}, "differential-privacy.plan"),
        ({"extra": {"dp.clip_norm": 1.0, "dp.min_updates": 2.5}}, "differential-privacy.plan"),
    ],
)
def test_training_bounds_hold_without_a_policy(train: dict[str, Any], rule: str) -> None:
    with pytest.raises(TaskRefused, match=rf"\[{rule}\]"):
        _gate().admit(_with_weights(fit_task(**train), LOGREG))


def test_a_policy_moves_the_bounds(tmp_path: Path) -> None:
    gate = _gate("[training]\nmax-epochs = 2\nmin-learning-rate = 0.01\n", tmp_path)
    assert gate.admit(_with_weights(fit_task(epochs=2, learning_rate=0.01), LOGREG))
    with pytest.raises(TaskRefused, match=r"\[training.max-epochs\]"):
        gate.admit(_with_weights(fit_task(epochs=3), LOGREG))
    with pytest.raises(TaskRefused, match=r"\[training.learning-rate\]"):
        gate.admit(_with_weights(fit_task(learning_rate=0.005), LOGREG))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[secure-aggregation]\nmin-threshold = 1.5\n", "must be a fraction in"),
        ("[secure-aggregation]\nmin-group-size = 1\n", "min-group-size"),
        ("[training]\nmin-learning-rate = 1.0\nmax-learning-rate = 0.5\n", "above max"),
    ],
)
def test_gate_settings_in_the_policy_are_checked(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(PolicyError, match=message):
        load_policy(tmp_path / "p.toml")


def test_an_unknown_task_kind_is_refused() -> None:
    gate = _gate()
    task = _with_weights(fit_task(), LOGREG)
    assert gate.admit(task).kind == "fit"  # positive control
    task.kind = 7  # type: ignore[assignment]
    with pytest.raises(TaskRefused, match=r"\[task.kind\]: this worker runs no tasks of kind 7"):
        gate.admit(task)


def test_distributed_noise_is_derived_by_the_worker() -> None:
    extra = {
        "dp.clip_norm": 0.5,
        "dp.noise_multiplier": 2.0,
        "dp.min_updates": 4.0,
        "dp.noise_std": 1e-9,  # a field a coordinator might send to lower the share: ignored
    }
    checked = _gate().admit(_with_weights(fit_task(extra=extra), LOGREG))
    assert checked.dp is not None
    # The default policy trusts no other silo: the whole noise z C, whatever m the plan says.
    assert checked.dp.noise_std == pytest.approx(2.0 * 0.5)


def test_a_claimed_update_count_never_thins_the_noise_below_the_policy(tmp_path: Path) -> None:
    """Issue 22 item 6: a coordinator claiming a million updates per sum would thin each
    share to z C / 1000; the worker relies on the honest silos its own policy names."""
    policy = "[training]\nmax-silos = 20\nhonest-silos = 4\n"
    gate = _gate(policy, tmp_path)
    dp = {"dp.clip_norm": 0.5, "dp.noise_multiplier": 2.0}
    honest = gate.admit(_with_weights(fit_task(extra={**dp, "dp.min_updates": 4.0}), LOGREG))
    assert honest.dp is not None
    assert honest.dp.noise_std == pytest.approx(2.0 * 0.5 / 2)  # positive control: m = h = 4
    fewer = gate.admit(_with_weights(fit_task(extra={**dp, "dp.min_updates": 2.0}), LOGREG))
    assert fewer.dp is not None
    assert fewer.dp.noise_std == pytest.approx(2.0 * 0.5 / math.sqrt(2))  # m < h: m counts
    inflated = {**dp, "dp.min_updates": 16.0}
    checked = gate.admit(_with_weights(fit_task(extra=inflated), LOGREG))
    assert checked.dp is not None
    assert checked.dp.noise_std == pytest.approx(2.0 * 0.5 / 2)  # still h = 4, not 16
    with pytest.raises(TaskRefused, match="max-silos") as refused:
        gate.admit(_with_weights(fit_task(extra={**dp, "dp.min_updates": 1e6}), LOGREG))
    assert refused.value.rule == "training.max-silos"


PRIVATE = """\
[differential-privacy]
required = "client-level"
[training]
allow-evaluation = true
evaluation-noise-multiplier = 5.0
[budget]
study = "s"
epsilon = 50.0
delta = 1e-5
ledger = "ledger.json"
"""


def test_under_dp_evaluation_is_off_unless_allowed_with_noise(tmp_path: Path) -> None:
    strict = _gate('[differential-privacy]\nrequired = "either"\n', tmp_path)
    with pytest.raises(TaskRefused, match=r"\[training.allow-evaluation\].*release of its data"):
        strict.admit(_with_weights(evaluate_task(), crafted_eval_weights(3)))
    (tmp_path / "p2.toml").write_text(
        '[differential-privacy]\nrequired = "either"\n[training]\nallow-evaluation = true\n'
    )
    with pytest.raises(PolicyError, match="needs evaluation-noise-multiplier"):
        load_policy(tmp_path / "p2.toml")


def test_an_allowed_evaluation_releases_only_a_noisy_accuracy_and_pays_for_it(
    tmp_path: Path,
) -> None:
    exact = EvalOutput(400, {"accuracy": 0.1025, "loss": 2.3})  # the share of class 3
    no_budget = PRIVATE[: PRIVATE.index("[budget]")]
    gate = _gate(no_budget, tmp_path)
    checked = gate.admit(_with_weights(evaluate_task(), crafted_eval_weights(3)))
    released = [gate.release_evaluation(checked, exact) for _ in range(200)]
    assert all(set(r.metrics) == {"accuracy"} for r in released)  # the loss never leaves
    correct = np.array([r.metrics["accuracy"] * r.num_examples for r in released])
    assert 4.0 < float(np.std(correct)) < 6.0  # noise of std 5 on the count
    # With a budget, each release is charged before it leaves.
    gate = _gate(PRIVATE, tmp_path)
    gate.release_evaluation(gate.admit(_with_weights(evaluate_task(), LOGREG)), exact)
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    (charge,) = ledger["studies"]["s"]["charges"]
    assert charge["noise_multiplier"] == pytest.approx(5.0 / math.sqrt(2))


def test_fit_metrics_under_dp_keep_only_what_is_accounted(tmp_path: Path) -> None:
    gate = _gate(PRIVATE, tmp_path)
    task = _with_weights(fit_task(extra={"dp.clip_norm": 0.1, "dp.noise_multiplier": 2.0}), LOGREG)
    checked = gate.admit(task)
    fit = FitOutput(LOGREG, 1, {"loss": 0.3, "accuracy": 0.9, "dpsgd_epsilon": 1.0})
    assert gate.release_fit(checked, fit).metrics == {"dpsgd_epsilon": 1.0}
    plain = _gate()
    assert plain.release_fit(plain.admit(_with_weights(fit_task(), LOGREG)), fit) is fit


def test_secagg_rules_follow_the_policy_and_the_plan(tmp_path: Path) -> None:
    from fedcore.secagg import SecAggParams
    from fedcore.secagg.setup import make_setup

    setup = make_setup(SecAggParams(), 5, 100)
    extra = {"dp.clip_norm": 1.0, "dp.noise_multiplier": 1.0, "dp.min_updates": 4.0}
    task = _with_weights(fit_task(secagg=setup, extra=extra), LOGREG)
    rules = _gate().admit(task).secagg_rules
    assert rules is not None
    assert (rules.min_group_size, rules.min_threshold, rules.min_survivors) == (3, 0.5, 4)
    relaxed = _gate("[secure-aggregation]\nmin-group-size = 2\nmin-threshold = 0.3\n", tmp_path)
    rules = relaxed.admit(task).secagg_rules
    assert rules is not None
    assert (rules.min_group_size, rules.min_threshold) == (2, 0.3)


def test_a_worker_contributes_once_per_global_model() -> None:
    from fedcore.secagg import SecAggParams
    from fedcore.secagg.setup import make_setup

    gate = _gate()
    setup = make_setup(SecAggParams(), 3, 100)
    checked = gate.admit(_with_weights(fit_task(secagg=setup), LOGREG))
    digest = gate.check_weights(checked, LOGREG)
    gate.record_contribution(checked, digest)
    with pytest.raises(TaskRefused, match=r"\[secure-aggregation.once-per-model\]"):
        gate.check_weights(checked, LOGREG)
    moved = {k: v + np.float32(1e-3) for k, v in LOGREG.items()}
    gate.check_weights(checked, moved)  # the next global model is a new version
    plain = gate.admit(_with_weights(fit_task(), LOGREG))
    gate.check_weights(plain, LOGREG)  # unmasked updates are visible anyway: no rule


def test_dpsgd_budget_survives_a_restart(tmp_path: Path) -> None:
    data = ArrayDataset(torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    state = tmp_path / "dpsgd.json"
    model = build_model(ModelSpec("logreg"), seed=0)
    first = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, max_epsilon=50.0, state_file=state)
    first(model, data, TrainConfig(batch_size=8), torch.device("cpu"))
    restarted = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, max_epsilon=50.0, state_file=state)
    assert restarted.epsilon == pytest.approx(first.epsilon)
    assert restarted.epsilon > 0


async def test_a_custom_model_configured_on_both_sides_trains(
    coordinator_factory: Any, shards: Path
) -> None:
    from fedcore.data import load_shard

    spec = ModelSpec("custom_model:make", {"hidden": 8})
    coordinator, task = await coordinator_factory(config(model=spec, rounds=1, min_workers=1))
    trainer = TorchTrainer(load_shard(shards / "shard-0.npz"), model=spec)
    worker = Worker(f"127.0.0.1:{coordinator.port}", "mine", trainer, give_up_after=TIMEOUT)
    await asyncio.wait_for(worker.run(), TIMEOUT)
    result = await asyncio.wait_for(task, TIMEOUT)
    assert worker.tasks_done >= 1
    assert worker.tasks_refused == 0
    assert set(result.weights) == {"1.weight", "1.bias", "3.weight", "3.bias"}


def test_distributed_noise_under_secure_aggregation_is_exact_on_the_rounds_grid() -> None:
    """Issue 22 item 7: the worker's share is a discrete Gaussian on the ring's integers; the
    noisy update is a grid point (rounded to the model's dtype), so no float noise is drawn."""
    fixed = FixedPoint(bits=24, clip=4.0, ring_bits=32)
    setup = RoundSetup("r1", 3, fixed, 1.0, 10.0)
    extra = {"dp.clip_norm": 0.5, "dp.noise_multiplier": 2.0, "dp.min_updates": 3.0}
    task = _with_weights(fit_task(extra=extra), LOGREG)
    task.secagg.CopyFrom(wire.setup_to_proto(setup))
    checked = _gate().admit(task)
    assert checked.dp is not None
    step = checked.dp.ring_step
    assert step is not None  # a secure round's ring
    assert step == pytest.approx(fixed.clip / fixed.levels)  # one ring unit, weight 1
    received = {k: np.zeros_like(v) for k, v in LOGREG.items()}
    updated = {k: np.full_like(v, 0.01) for k, v in LOGREG.items()}
    noisy = np.concatenate(
        [a.reshape(-1) for a in privatize_update(received, updated, checked.dp).delta.values()]
    ).astype(np.float64)
    words = noisy / step
    # Grid points, up to the float32 rounding of the model's dtype (a function of the noisy
    # integer alone: post-processing).
    assert (np.abs(words - np.rint(words)) <= np.abs(words) * 2.0**-24 + 1e-6).all()
    size = noisy.size
    sigma = 2.0 * (0.5 / step + 2 * math.sqrt(size))  # the whole noise: honest-silos 1
    assert float((words - words.mean()).std()) == pytest.approx(sigma, rel=0.05)
    assert checked.dp.noise_std * (1 + 2 * math.sqrt(size) * step / 0.5) == pytest.approx(
        sigma * step
    )
