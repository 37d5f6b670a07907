"""The worker's plan check behind the gate, and the request queue (in process)."""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict, Unpack

import pytest
import torch

from fedcore.codec import make_header
from fedcore.errors import PolicyError, TaskRefused
from fedcore.model_catalog import ModelCatalog
from fedcore.models import build_model
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.plans import Plan, export_plan
from fedcore.plans.queue import RequestQueue, Terms
from fedcore.policy import PlanRules, load_policy
from fedcore.secagg import SecAggParams, wire
from fedcore.secagg.quantize import COUNT_WORDS
from fedcore.secagg.setup import make_setup
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.worker.gate import Gate
from fedcore.worker.plans import PlanLibrary


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
    assert record.terms.train is not None
    assert record.terms.train.batch_size == 32
    assert queue.program(record.hash) == plan.program
    queue.decide(record.id, approve=True)
    restarted = _gate(rules)  # a restarted worker reads the same decision
    assert restarted.admit(_task(plan)).model.name == plan.model_name
    queue.decide(record.id, approve=False, reason="not for our patients")
    with pytest.raises(TaskRefused, match="denied by the data owner: not for our patients"):
        restarted.admit(_task(plan))
    assert queue.find(record.hash[:8]).status == "denied"


class _Caps(TypedDict, total=False):
    """The request queue's caps (PlanRules' defaults where left out)."""

    max_pending: int
    max_queue_bytes: int
    max_requests_per_day: int


def _approval_rules(tmp_path: Path, **caps: Unpack[_Caps]) -> PlanRules:
    return PlanRules(require_approval=True, requests=tmp_path / "queue", **caps)


def _fit(plan: Plan, *, secagg: bool = False, **train: object) -> pb.Task:
    task = _task(plan)
    config = {"epochs": 1, "batch_size": 32, **train}
    task.train.CopyFrom(TrainConfig(**config).to_proto())  # type: ignore[arg-type]
    if secagg:
        task.secagg.CopyFrom(wire.setup_to_proto(make_setup(SecAggParams(), 3, 7850 + COUNT_WORDS)))
    return task


def test_approval_binds_the_terms_and_other_terms_make_a_new_request(
    plan: Plan, tmp_path: Path
) -> None:
    rules = _approval_rules(tmp_path)
    gate = _gate(rules)
    queue = RequestQueue(tmp_path / "queue")
    with pytest.raises(TaskRefused, match="awaiting approval"):
        gate.admit(_fit(plan, learning_rate=0.05))
    (first,) = queue.list()
    queue.decide(first.id, approve=True)
    assert gate.admit(_fit(plan, learning_rate=0.05)).model.name == plan.model_name  # control

    # Every term the owner saw is bound: each change is refused, naming the new request.
    dp = {"dp.clip_norm": 1.0, "dp.noise_multiplier": 1.0}
    changes: list[tuple[pb.Task, str]] = [
        (_fit(plan, learning_rate=0.05, epochs=5), "epochs 1 -> 5"),
        (_fit(plan, learning_rate=0.05, batch_size=1), "batch_size 32 -> 1"),
        (_fit(plan, learning_rate=0.5), "learning_rate 0.05 -> 0.5"),
        (_fit(plan, learning_rate=0.05, extra=dp), "extra {} -> {'dp.clip_norm'"),
    ]
    for task, changed in changes:
        with pytest.raises(TaskRefused, match="under other terms") as refused:
            gate.admit(task)
        message = str(refused.value)
        assert changed in message
        new = [r for r in queue.list() if r.id[:16] in message and r.id != first.id]
        assert len(new) == 1
        assert (new[0].status, new[0].hash) == ("pending", first.hash)
    assert len(queue.list()) == 1 + len(changes)

    # A DP plan approved with DP on: the same task without DP is other terms.
    with_dp = queue.lookup(first.hash, Terms.of(_fit(plan, learning_rate=0.05, extra=dp)))
    assert with_dp is not None
    queue.decide(with_dp.id, approve=True)
    gate.admit(_fit(plan, learning_rate=0.05, extra=dp))
    off = {"dp.clip_norm": 1.0}  # noise dropped
    with pytest.raises(TaskRefused, match="under other terms"):
        gate.admit(_fit(plan, learning_rate=0.05, extra=off))


def test_secure_aggregation_lr_range_and_rounds_are_terms_too(plan: Plan, tmp_path: Path) -> None:
    gate = _gate(_approval_rules(tmp_path))
    queue = RequestQueue(tmp_path / "queue")
    with pytest.raises(TaskRefused, match="awaiting approval"):
        gate.admit(_fit(plan, learning_rate=0.05, secagg=True))
    (request,) = queue.list()
    assert request.secagg
    queue.decide(request.id, approve=True, lr_range=(0.01, 0.1), rounds=2)
    gate.admit(_fit(plan, learning_rate=0.02, secagg=True))  # inside the approved range
    with pytest.raises(TaskRefused, match=r"secagg True -> False"):
        gate.admit(_fit(plan, learning_rate=0.02))  # secure aggregation switched off
    with pytest.raises(TaskRefused, match="under other terms"):
        gate.admit(_fit(plan, learning_rate=0.2, secagg=True))  # outside the range
    gate.admit(_fit(plan, learning_rate=0.1, secagg=True))  # round 2 of 2
    with pytest.raises(TaskRefused, match=r"covered 2 round\(s\), all run"):
        gate.admit(_fit(plan, learning_rate=0.1, secagg=True))
    queue.decide(request.id, approve=True, rounds=1)  # approved again: counts afresh
    gate.admit(_fit(plan, learning_rate=0.05, secagg=True))


@pytest.mark.slow
def test_the_queue_has_caps_and_says_so_when_full(plan: Plan, tmp_path: Path) -> None:
    pending = _gate(_approval_rules(tmp_path / "a", max_pending=2))
    for epochs in (1, 2):
        with pytest.raises(TaskRefused, match="awaiting approval"):
            pending.admit(_fit(plan, epochs=epochs))
    with pytest.raises(TaskRefused, match=r"\[plans.queue\].*2 requests await a decision"):
        pending.admit(_fit(plan, epochs=3))
    assert len(RequestQueue(tmp_path / "a" / "queue").list()) == 2  # the third was not stored

    daily = _approval_rules(tmp_path / "b", max_requests_per_day=1, max_pending=100)
    library = PlanLibrary(daily, max_model_bytes=1 << 30, coordinator="coord.example:443")
    gate = Gate(ModelCatalog(), max_model_bytes=1 << 30, plans=library)
    with pytest.raises(TaskRefused, match="awaiting approval"):
        gate.admit(_fit(plan, epochs=1))
    with pytest.raises(TaskRefused, match=r"\[plans.queue\].*1 plan requests in the last 24 h"):
        gate.admit(_fit(plan, epochs=2))
    # Another coordinator has its own count.
    other = PlanLibrary(daily, max_model_bytes=1 << 30, coordinator="other.example:443")
    with pytest.raises(TaskRefused, match="awaiting approval"):
        Gate(ModelCatalog(), max_model_bytes=1 << 30, plans=other).admit(_fit(plan, epochs=2))

    size = plan.program.ByteSize()
    small = _gate(_approval_rules(tmp_path / "c", max_queue_bytes=size - 1))
    with pytest.raises(TaskRefused, match=r"\[plans.queue\].*bytes of plans"):
        small.admit(_fit(plan))
    fits = _gate(_approval_rules(tmp_path / "d", max_queue_bytes=size))
    with pytest.raises(TaskRefused, match="awaiting approval"):
        fits.admit(_fit(plan))
    # The same program under other terms takes no more bytes: stored once.
    with pytest.raises(TaskRefused, match="awaiting approval"):
        fits.admit(_fit(plan, epochs=2))


def test_policy_reads_the_plans_caps_and_sandbox_limits(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        "[plans]\nmax-pending = 3\nmax-queue-bytes = 1000\nmax-requests-per-day = 2\n"
        "accept-buffers = []\nsandbox = false\nsandbox-memory-bytes = 1_073_741_824\n"
        "sandbox-cpu-seconds = 60\n"
    )
    rules = load_policy(path).plans
    assert (rules.max_pending, rules.max_queue_bytes, rules.max_requests_per_day) == (3, 1000, 2)
    assert rules.accept_buffers == ()
    assert (rules.sandbox, rules.sandbox_memory_bytes, rules.sandbox_cpu_seconds) == (
        False,
        1 << 30,
        60,
    )
    path.write_text('[plans]\naccept-buffers = ["anything"]\n')
    with pytest.raises(PolicyError, match="unknown kind"):
        load_policy(path)
