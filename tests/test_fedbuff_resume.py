"""FedBuff checkpoints each global update and resumes from it (issue 24): the in-process
coordinator with scripted workers, whose results make every update exact."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from test_coordinator import TIMEOUT, ScriptedTrainer, config, initial_weights, run_worker

from fedcore.plan import ModelSpec, TrainConfig
from fedcore.server import Coordinator, FederationResult
from fedcore.server.state.checkpoint import load_checkpoint
from fedcore.strategy import FedBuff
from fedcore.weights import Weights
from fedcore.worker import FitOutput


class CountingFedBuff(FedBuff):
    """FedBuff that counts its global updates: state that must survive a restart."""

    def __init__(self) -> None:
        # staleness_exponent=0: every update adds exactly its buffer's mean offset.
        super().__init__(buffer_size=2, staleness_exponent=0.0)
        self.updates = 0

    def aggregate_fit(
        self,
        round_number: int,
        global_weights: Weights,
        aggregate: Weights,
        results: Any,
        failures: Any,
    ) -> Weights:
        self.updates += 1
        assert self.updates == round_number, "an update applied twice or skipped"
        return aggregate

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.updates = int(state["updates"])


class DPSGDTrainer(ScriptedTrainer):
    """Reports a DP-SGD silo's running (epsilon, delta), ``step`` more after every fit."""

    def __init__(self, offset: float, examples: int, *, spent: float, step: float) -> None:
        super().__init__(offset, examples)
        self.spent, self.step = spent, step

    def fit(self, model: ModelSpec, weights: Weights, config: TrainConfig) -> FitOutput:
        out = super().fit(model, weights, config)
        self.spent += self.step
        return FitOutput(
            out.weights, out.num_examples, {"dpsgd_epsilon": self.spent, "dpsgd_delta": 1e-5}
        )


async def _federation(
    coordinator_factory: Any, trainers: dict[str, ScriptedTrainer], **kw: Any
) -> tuple[Coordinator, FederationResult]:
    strategy = CountingFedBuff()
    coordinator, task = await coordinator_factory(
        config(min_workers=len(trainers), **kw), strategy=strategy
    )
    workers = asyncio.gather(
        *(run_worker(coordinator.port, name, t) for name, t in trainers.items())
    )
    result = await asyncio.wait_for(task, TIMEOUT)
    await workers
    return coordinator, result


async def test_fedbuff_resumes_from_its_last_global_update(
    coordinator_factory: Any, tmp_path: Path
) -> None:
    """3 updates, checkpointed; resumed for updates 4 and 5: the checkpoint holds the first
    run's final model, the counter and the strategy's state go on from 3, and every row is
    there once."""
    ckpt = tmp_path / "ckpt"
    metrics = tmp_path / "metrics.jsonl"
    trainers = {"a": ScriptedTrainer(1.0, 10), "b": ScriptedTrainer(1.0, 30)}
    _, first_result = await _federation(
        coordinator_factory, trainers, rounds=3, checkpoint_dir=ckpt, metrics_out=metrics
    )
    saved = load_checkpoint(ckpt)
    assert saved is not None
    assert saved.round == 3
    assert [row["round"] for row in saved.metrics] == [1, 2, 3]
    assert saved.states["strategy"] == {"updates": 3}
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(first_result.weights[name], w0 + 3.0, atol=1e-5)
        np.testing.assert_array_equal(saved.weights[name], first_result.weights[name])

    trainers = {"a": ScriptedTrainer(1.0, 10), "b": ScriptedTrainer(1.0, 30)}
    resumed, result = await _federation(
        coordinator_factory,
        trainers,
        rounds=5,
        checkpoint_dir=ckpt,
        resume=True,
        metrics_out=metrics,
    )
    assert resumed.start_round == 4
    assert resumed.strategy.updates == 5  # type: ignore[attr-defined]
    # Updates 4 and 5 started from the checkpoint's model: +1 each on top of it.
    for name, w in saved.weights.items():
        np.testing.assert_allclose(result.weights[name], w + 2.0, atol=1e-5)
    assert [r.round for r in result.rounds] == [1, 2, 3, 4, 5]
    lines = metrics.read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3, 4, 5]
    assert load_checkpoint(ckpt).round == 5  # type: ignore[union-attr]


async def test_a_silos_epsilon_never_goes_down_across_a_restart(
    coordinator_factory: Any, tmp_path: Path
) -> None:
    """A DP-SGD silo's reported epsilon stays in every later row, restored ones included:
    resumed without silo "b", the coordinator still shows what "b" spent before."""
    ckpt = tmp_path / "ckpt"
    trainers: dict[str, ScriptedTrainer] = {
        "a": DPSGDTrainer(1.0, 10, spent=0.0, step=0.5),
        "b": DPSGDTrainer(1.0, 30, spent=2.0, step=1.0),
    }
    _, first_result = await _federation(
        coordinator_factory, trainers, rounds=2, checkpoint_dir=ckpt
    )
    before = first_result.rounds[-1].privacy
    assert before is not None
    # Positive control: both silos reported, and the row's train metrics hide the spend.
    assert set(before["silos"]) == {"a", "b"}
    assert "dpsgd_epsilon" not in first_result.rounds[-1].train
    spent_b = before["silos"]["b"]["epsilon"]
    assert spent_b >= 3.0

    only_a: dict[str, ScriptedTrainer] = {"a": DPSGDTrainer(1.0, 10, spent=10.0, step=0.5)}
    _, result = await _federation(
        coordinator_factory, only_a, rounds=4, checkpoint_dir=ckpt, resume=True
    )
    for row in result.rounds[2:]:
        assert row.privacy is not None
        assert row.privacy["silos"]["b"]["epsilon"] == spent_b
        assert row.privacy["silos"]["a"]["epsilon"] > 10.0
