"""What of a plan's state leaves the worker, and what a plan may do to the silo's data
(in process; tests/test_plan_release_e2e.py drives the same through a real fed-worker)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedcore.worker.plans import PlanLibrary, plan_state
from fedcore.worker.trainer import TorchTrainer
from plan_models import BatchNormNet, OverwritesInput, RowInBuffer, plan_of
from torch import nn

from fedcore.data.shards import ArrayDataset
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.plans import Plan, verify_program
from fedcore.policy import PlanRules
from fedcore.v1 import fedcore_pb2 as pb


class StatisticAlsoWritten(nn.Module):
    """A batch-norm whose running mean is also written through a view of it."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(784)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        self.norm.running_mean[:4].copy_(flat[0, :4])
        out: torch.Tensor = self.norm(flat)[:, :10]
        return out


def _trainer(plan: Plan, rules: PlanRules | None = None) -> tuple[TorchTrainer, ArrayDataset]:
    rng = np.random.default_rng(0)
    data = ArrayDataset(
        rng.normal(size=(64, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 64)
    )
    library = PlanLibrary(rules or PlanRules(sandbox=False), max_model_bytes=1 << 30)
    task = pb.Task(kind=pb.TASK_KIND_EVALUATE, model=pb.ModelSpec(name=plan.model_name))
    task.plan.CopyFrom(plan.program)
    library._verify(task.plan)
    return TorchTrainer(data, plans=library), data


def test_only_parameters_and_accepted_statistics_are_released() -> None:
    leak = plan_state(verify_program(plan_of(RowInBuffer()).program), ("batch-norm",))
    assert leak.released.withheld == ("running_mean",)
    assert leak.released.released == {"linear.weight", "linear.bias"}
    bn = plan_state(verify_program(plan_of(BatchNormNet()).program), ("batch-norm",))
    stats = {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}
    assert bn.released.statistics == stats
    assert bn.released.withheld == ()
    # The owner accepts no buffer kind: batch-norm statistics stay too.
    assert (
        set(plan_state(verify_program(plan_of(BatchNormNet()).program), ()).released.withheld)
        == stats
    )
    # A statistic that is also written another way is no longer of the accepted kind.
    mixed = plan_state(verify_program(plan_of(StatisticAlsoWritten()).program), ("batch-norm",))
    assert "norm.running_mean" in mixed.released.withheld
    assert "norm.running_var" in mixed.released.statistics


def test_a_buffer_holding_a_training_row_goes_back_as_received() -> None:
    plan = plan_of(RowInBuffer())
    trainer, data = _trainer(plan)
    received = dict(plan.weights)
    fit = trainer.fit(ModelSpec(plan.model_name), received, TrainConfig(batch_size=8))
    assert np.array_equal(fit.weights["running_mean"], received["running_mean"])
    assert not np.array_equal(fit.weights["linear.bias"], received["linear.bias"])  # it trained
    rows = data.x.flatten(1).numpy()
    assert not any(np.allclose(fit.weights["running_mean"], row) for row in rows)


def test_honest_batch_norm_statistics_are_uploaded() -> None:
    plan = plan_of(BatchNormNet())
    trainer, _ = _trainer(plan)
    received = dict(plan.weights)
    fit = trainer.fit(ModelSpec(plan.model_name), received, TrainConfig(batch_size=8))
    assert not np.array_equal(fit.weights["norm.running_mean"], received["norm.running_mean"])
    assert not np.array_equal(fit.weights["norm.running_var"], received["norm.running_var"])
    assert int(fit.weights["norm.num_batches_tracked"]) == 64 // 8


@pytest.mark.parametrize("task", ["evaluate", "fit"])
def test_a_plan_cannot_overwrite_the_data_it_reads(task: str) -> None:
    plan = plan_of(OverwritesInput())
    trainer, data = _trainer(plan)
    before = data.x.clone()
    spec = ModelSpec(plan.model_name)
    first = trainer.evaluate(spec, plan.weights)
    if task == "fit":
        trainer.fit(spec, plan.weights, TrainConfig(batch_size=8))
    assert torch.equal(data.x, before)
    assert trainer.evaluate(spec, plan.weights).metrics == first.metrics
