"""Attacks 1-3 of issue 23 (and 5, at the verifier) against a real ``fed-worker``, from a
scripted hostile coordinator.

The worker is started as the docs tell a data owner (no --model, no policy: plans accepted
without approval). The positive control is an honest plan trained through the same stream;
then each attack plan (built with the attacker's own tools, tests/plan_attacks.py) is sent
as a fit task and refused by the verifier with its reason, and the worker stays up.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Proc, start_worker
from hostile import Session, fit_task, hostile_coordinator
from plan_attacks import EmptyLeak, FullAsk, InputOverwrite, RowInBuffer, raw_program, retouch
from torch import nn

from fedcore.plans import export_plan
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights

pytestmark = pytest.mark.slow

IMAGE = torch.zeros(2, 1, 28, 28)


def _plan_task(program: pb.PlanProgram) -> pb.Task:
    task = fit_task("plan-" + program.hash, batch_size=32)
    task.plan.CopyFrom(program)
    return task


def _weights(module: nn.Module) -> Weights:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


async def _refusal(session: Session, program: pb.PlanProgram, weights: Weights) -> str:
    message = await session.refusal(await session.send_task(_plan_task(program), weights))
    assert "[plans.verification]" in message, message
    return message


def _ask_full(size: int) -> object:
    def change(doc: dict[str, object]) -> None:
        for node in doc["graph_module"]["graph"]["nodes"]:  # type: ignore[index]
            if node["target"] == "torch.ops.aten.full.default":
                node["inputs"][0]["arg"] = {"as_ints": [size]}

    return change


async def test_a_worker_refuses_plans_that_carry_data_out_or_exhaust_memory(
    shards: Path, procs: list[Proc]
) -> None:
    async with hostile_coordinator() as (coordinator, port):
        worker = start_worker(procs, port, shards / "shard-0.npz", "silo", "--give-up-after", "60")
        session = await asyncio.wait_for(coordinator.session_of("silo"), 90)

        # Positive control: an honest plan (with batch-norm statistics) trains and returns.
        honest = export_plan(_BNNet(), IMAGE)
        result, update = await session.outcome(
            await session.send_task(_plan_task(honest.program), honest.weights)
        )
        assert isinstance(result, pb.TaskResult), result
        assert result.num_examples == 400
        assert not np.array_equal(update["bn.running_mean"], honest.weights["bn.running_mean"])

        # 1. A training row copied into a buffer through an in-place write on a view.
        row = RowInBuffer()
        message = await _refusal(session, raw_program(row, IMAGE), _weights(row))
        assert "writes into buffer 'running_mean'" in message

        # 2. Uninitialised memory (freed heap) copied into a uint8 buffer.
        leak = EmptyLeak()
        message = await _refusal(session, raw_program(leak, IMAGE), _weights(leak))
        assert "writes into buffer 'stats'" in message

        # 3. aten.full asked for 2^50 elements while its metadata declares [7].
        full = FullAsk()
        attack = retouch(raw_program(full, IMAGE), _ask_full(1 << 50))  # type: ignore[arg-type]
        message = await _refusal(session, attack, _weights(full))
        assert "makes float32[1125899906842624] but the graph declares float32[7]" in message

        # 5. (at the verifier) The batch, a view of the silo's dataset, overwritten in place.
        overwrite = InputOverwrite()
        message = await _refusal(session, raw_program(overwrite, IMAGE), _weights(overwrite))
        assert "writes into the input batch" in message

        # The worker is still up and trains the honest plan again.
        result, _ = await session.outcome(
            await session.send_task(_plan_task(honest.program), honest.weights)
        )
        assert isinstance(result, pb.TaskResult), result
        await session.send(pb.CoordinatorMessage(shutdown=pb.Shutdown(reason="test over")))
        assert await asyncio.to_thread(worker.wait, 60) == 0, worker.output


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))  # type: ignore[no-any-return]
