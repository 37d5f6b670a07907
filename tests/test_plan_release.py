"""What of a plan's state leaves the worker, and what a plan may do to the silo's data
(in process; tests/test_plan_release_e2e.py drives the same through a real fed-worker).

The runtime's rules hold whatever the verifier decides: the first tests exercise them on
exported programs and modules directly; the trainer tests go through verification, where a
refusal also keeps the data in (nothing runs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from plan_models import BatchNormNet, OverwritesInput, RowInBuffer, plan_of
from torch import nn

from fedcore.codec import make_header
from fedcore.data.shards import ArrayDataset
from fedcore.errors import TaskRefused
from fedcore.model_catalog import ModelCatalog
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.plans import Plan
from fedcore.policy import PlanRules
from fedcore.policy.model import BUFFER_KINDS
from fedcore.training import evaluate
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.worker.gate import Gate
from fedcore.worker.plan_state import released_state
from fedcore.worker.plans import PlanLibrary, PlanState, read_only_input
from fedcore.worker.trainer import TorchTrainer


class StatisticAlsoWritten(nn.Module):
    """A batch-norm whose running mean is also written through a view of it."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(784)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        running_mean = self.norm.running_mean
        assert running_mean is not None  # track_running_stats is on
        running_mean[:4].copy_(flat[0, :4])
        out: torch.Tensor = self.norm(flat)[:, :10]
        return out


def _data() -> ArrayDataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 1, 28, 28)).astype(np.float32)
    return ArrayDataset(x, rng.integers(0, 10, 64))


def _released(module: nn.Module, accept: tuple[str, ...] = BUFFER_KINDS) -> PlanState:
    """The release rule on the exported program alone (no verification)."""
    plan = plan_of(module, verified=False)
    params = frozenset(n for n, _ in module.named_parameters())
    buffers = {
        n: (str(b.numpy().dtype), b.dim() == 0)
        for n, b in module.named_buffers()
        if n in plan.weights
    }
    state = released_state(plan.program, parameters=params, buffers=buffers, accept=accept)
    return PlanState(state, {})


@pytest.mark.slow
def test_only_parameters_and_accepted_statistics_are_released() -> None:
    leak = _released(RowInBuffer())
    assert leak.released.withheld == ("running_mean",)
    assert leak.released.released == {"linear.weight", "linear.bias"}
    stats = {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}
    bn = _released(BatchNormNet())
    assert bn.released.statistics == stats
    assert bn.released.withheld == ()
    # The owner accepts no buffer kind: batch-norm statistics stay too.
    assert set(_released(BatchNormNet(), ()).released.withheld) == stats
    # A statistic that is also written another way is no longer of the accepted kind.
    mixed = _released(StatisticAlsoWritten())
    assert "norm.running_mean" in mixed.released.withheld
    assert "norm.running_var" in mixed.released.statistics
    # What is uploaded: trained parameters, the received value of a withheld buffer.
    trained = {"linear.weight": np.ones(2), "running_mean": np.full(2, 7.0)}
    received = {"linear.weight": np.zeros(2), "running_mean": np.zeros(2)}
    upload = leak.upload(trained, received)
    assert upload["running_mean"] is received["running_mean"]
    assert upload["linear.weight"] is trained["linear.weight"]


def test_a_module_made_read_only_cannot_overwrite_the_data_it_reads() -> None:
    data = _data()
    before = data.x.clone()
    module = OverwritesInput().eval()
    first = evaluate(read_only_input(module), data)
    assert torch.equal(data.x, before)
    assert evaluate(module, data) == first
    evaluate(OverwritesInput().eval(), data)  # positive control: unprotected, it writes
    assert not torch.equal(data.x, before)


def _trainer(plan: Plan) -> tuple[TorchTrainer, ArrayDataset] | None:
    """A trainer holding ``plan`` verified, or None when the verifier refuses it (the rules
    behind the verifier are tested on their own above: ``released_state`` and
    ``read_only_input``)."""
    data = _data()
    library = PlanLibrary(PlanRules(sandbox=False), max_model_bytes=1 << 30)
    task = pb.Task(
        kind=pb.TASK_KIND_EVALUATE,
        model=pb.ModelSpec(name=plan.model_name),
        weights=make_header(plan.weights, 1 << 20),
        plan=plan.program,
    )
    try:
        Gate(ModelCatalog(), max_model_bytes=1 << 30, plans=library).admit(task)
    except TaskRefused as exc:
        if exc.rule != "plans.verification":
            raise
        return None
    return TorchTrainer(data, plans=library), data


def test_a_buffer_holding_a_training_row_is_refused_before_anything_runs() -> None:
    # Two layers: the verifier refuses the write into a buffer (here), and were it to miss
    # one, the release rule withholds the buffer (test_only_parameters_and_...).
    assert _trainer(plan_of(RowInBuffer(), verified=False)) is None


@pytest.mark.slow
def test_honest_batch_norm_statistics_are_uploaded() -> None:
    plan = plan_of(BatchNormNet())
    made = _trainer(plan)
    assert made is not None  # an honest plan verifies
    trainer, _ = made
    received = dict(plan.weights)
    fit = trainer.fit(ModelSpec(plan.model_name), received, TrainConfig(batch_size=8))
    assert not np.array_equal(fit.weights["norm.running_mean"], received["norm.running_mean"])
    assert not np.array_equal(fit.weights["norm.running_var"], received["norm.running_var"])
    assert int(fit.weights["norm.num_batches_tracked"]) == 64 // 8


def test_a_plan_overwriting_its_input_is_refused_before_anything_runs() -> None:
    # Two layers: the verifier refuses the write into the input (here), and were it to miss
    # one, the graph reads a copy (test_a_module_made_read_only_...).
    assert _trainer(plan_of(OverwritesInput(), verified=False)) is None
