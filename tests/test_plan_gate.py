"""The worker's plan check behind the gate, and the request queue (in process)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fedcore.worker.gate import Gate
from fedcore.worker.plans import PlanLibrary

from fedcore.codec import make_header
from fedcore.errors import TaskRefused
from fedcore.model_catalog import ModelCatalog
from fedcore.models import build_model
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.plans import Plan, export_plan
from fedcore.plans.queue import RequestQueue
from fedcore.policy import PlanRules
from fedcore.v1 import fedcore_pb2 as pb


@pytest.fixture(scope="module")
def plan() -> Plan:
    return export_plan(build_model(ModelSpec("logreg"), seed=0), torch.zeros(2, 1, 28, 28))


def _task(plan: Plan, *, name: str | None = None) -> pb.Task:
    return pb.Task(
        task_id="t1",
        round=1,
        kind=pb.TASK_KIND_FIT,
        model=pb.ModelSpec(name=name or plan.model_name),
        train=TrainConfig(epochs=1, batch_size=32).to_proto(),
        weights=make_header(plan.weights, 1 << 20),
        plan=plan.program,
    )


def _gate(rules: PlanRules, *, dpsgd: bool = False) -> Gate:
    library = PlanLibrary(rules, max_model_bytes=1 << 30, dpsgd=dpsgd)
    return Gate(ModelCatalog(), max_model_bytes=1 << 30, plans=library)


def test_gate_admits_a_verified_plan_and_the_trainer_can_build_it(plan: Plan) -> None:
    gate = _gate(PlanRules())
    checked = gate.admit(_task(plan))
    assert checked.model.name == plan.model_name
    assert gate.plans is not None
    module = gate.plans.build(checked.model)
    assert module is not None
    assert list(module.state_dict()) == list(plan.weights)


def test_gate_refuses_plans_when_not_wired_or_not_accepted(plan: Plan) -> None:
    with pytest.raises(TaskRefused, match=r"\[plans.accept\]"):
        Gate(ModelCatalog(), max_model_bytes=1 << 30).admit(_task(plan))
    with pytest.raises(TaskRefused, match=r"\[plans.accept\]"):
        _gate(PlanRules(accept=False)).admit(_task(plan))
    # A worker whose owner configured one model (--model) runs that model only.
    library = PlanLibrary(PlanRules(), max_model_bytes=1 << 30)
    only_cnn = Gate(ModelCatalog(ModelSpec("mnist-cnn")), max_model_bytes=1 << 30, plans=library)
    with pytest.raises(TaskRefused, match=r"runs only model mnist-cnn \(--model\)"):
        only_cnn.admit(_task(plan))


def test_gate_refuses_a_task_naming_another_plan_and_dpsgd_silos(plan: Plan) -> None:
    with pytest.raises(TaskRefused, match=r"\[plans.hash\]"):
        _gate(PlanRules()).admit(_task(plan, name="plan-" + "0" * 64))
    with pytest.raises(TaskRefused, match=r"\[plans.dpsgd\].*Opacus"):
        _gate(PlanRules(), dpsgd=True).admit(_task(plan))


def test_gate_refuses_weights_that_do_not_fit_the_plan(plan: Plan) -> None:
    task = _task(plan)
    task.weights.tensors[0].shape[:] = [3, 3]
    with pytest.raises(TaskRefused, match=r"\[model.weights\]"):
        _gate(PlanRules()).admit(task)


def test_approval_queue_waits_approves_denies_and_survives_restarts(
    plan: Plan, tmp_path: Path
) -> None:
    rules = PlanRules(require_approval=True, requests=tmp_path / "queue")
    with pytest.raises(TaskRefused, match="awaiting approval"):
        _gate(rules).admit(_task(plan))
    queue = RequestQueue(tmp_path / "queue")  # another process: the owner's command
    (record,) = queue.list()
    assert record.status == "pending"
    assert record.terms.batch_size == 32
    assert queue.program(record.hash) == plan.program
    queue.decide(record.id, approve=True)
    restarted = _gate(rules)  # a restarted worker reads the same decision
    assert restarted.admit(_task(plan)).model.name == plan.model_name
    queue.decide(record.id, approve=False, reason="not for our patients")
    with pytest.raises(TaskRefused, match="denied by the data owner: not for our patients"):
        restarted.admit(_task(plan))
    assert queue.find(record.hash[:8]).status == "denied"
