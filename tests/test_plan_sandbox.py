"""The plan sandbox (worker/sandbox.py): plans train in a child process with a memory limit,
a CPU-time limit, no new privileges and no sockets; a child that hits a limit fails its task
only, and the next task gets a fresh child."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from plan_models import BatchNormNet, MemoryHog, plan_of

from fedcore.data.shards import ArrayDataset
from fedcore.errors import TrainingFailed
from fedcore.plan import TrainConfig
from fedcore.plans import Plan, verify_program
from fedcore.policy.model import BUFFER_KINDS
from fedcore.training import train
from fedcore.worker.sandbox import PlanSandbox, SandboxLimits

pytestmark = pytest.mark.slow  # each sandbox starts a Python with torch (seconds)


@pytest.fixture(scope="module")
def data() -> ArrayDataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 1, 28, 28)).astype(np.float32)
    return ArrayDataset(x, rng.integers(0, 10, 256))


def _run(box: PlanSandbox, plan: Plan, config: TrainConfig) -> dict[str, np.ndarray]:
    signature = verify_program(plan.program).signature
    return box.run(plan.program, plan.weights, config, signature).weights


def test_the_child_trains_as_this_process_would_and_hits_its_memory_limit_alone(
    data: ArrayDataset,
) -> None:
    plan = plan_of(BatchNormNet())
    config = TrainConfig(batch_size=32, seed=3)
    box = PlanSandbox(SandboxLimits(256 * 1024**2, 120), (data.x, data.y), None, BUFFER_KINDS)
    try:
        trained = _run(box, plan, config)  # positive control: the same numbers as here
        here = verify_program(plan.program).build()
        here.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in plan.weights.items()})
        train(here, data, config)
        for name, tensor in here.state_dict().items():
            np.testing.assert_allclose(trained[name], tensor.numpy(), rtol=1e-5, atol=1e-6)

        # 64 examples x 4,000 copies x 3 KB: 800 MB, past the 256 MB the child may add.
        hog = plan_of(MemoryHog())
        with pytest.raises(
            TrainingFailed, match=r"out of its sandbox's memory limit \(268,435,456"
        ):
            _run(box, hog, TrainConfig(batch_size=64))
        # Only the child went: the next task gets a fresh one and trains.
        again = _run(box, plan, config)
        np.testing.assert_array_equal(again["norm.running_mean"], trained["norm.running_mean"])
    finally:
        box.close()


def test_a_cpu_bound_plan_is_stopped_by_the_cpu_limit(data: ArrayDataset) -> None:
    plan = plan_of(BatchNormNet())
    box = PlanSandbox(SandboxLimits(1024**3, 1), (data.x, data.y), None, ())
    try:
        _run(box, plan, TrainConfig(batch_size=256))  # positive control: one quick epoch
        with pytest.raises(TrainingFailed, match=r"CPU-time limit \(1 s per task\)"):
            _run(box, plan, TrainConfig(epochs=100, batch_size=1))
    finally:
        box.close()


def test_the_lockdown_denies_sockets_exec_and_new_privileges() -> None:
    code = textwrap.dedent(
        """
        import os, socket
        from fedcore.worker.sandbox import SandboxLimits, lock_down
        print("missing", lock_down(SandboxLimits(64 * 1024**2, 5)))
        print("nnp", [l for l in open("/proc/self/status") if l.startswith("NoNewPrivs")][0].split()[1])
        for what, attempt in [
            ("socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)),
            ("unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)),
            ("exec", lambda: os.execv("/bin/true", ["true"])),
        ]:
            try:
                attempt()
                print(what, "allowed")
            except PermissionError:
                print(what, "denied")
        try:
            bytearray(256 * 1024**2)
            print("memory", "allowed")
        except MemoryError:
            print("memory", "denied")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines == {
        "missing": "[]",
        "nnp": "1",
        "socket": "denied",
        "unix": "denied",
        "exec": "denied",
        "memory": "denied",
    }, done.stdout + done.stderr
