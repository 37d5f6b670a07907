"""Real ``fed-worker`` processes against a scripted hostile coordinator (tests/hostile.py).

Each test first shows an honest task succeeding through the same harness (the positive
control), then sends the attacks one after another on the same stream: each is refused with
its rule named, nothing of it runs, and the worker stays up for the next one.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import Proc, start_worker
from hostile import (
    FakePeers,
    Session,
    crafted_eval_weights,
    evaluate_task,
    fit_task,
    hostile_coordinator,
)

from fedcore.models import build_model, get_weights
from fedcore.plan import ModelSpec
from fedcore.secagg import SecAggParams
from fedcore.secagg.quantize import COUNT_WORDS
from fedcore.secagg.setup import make_setup
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights

pytestmark = pytest.mark.slow

WORDS = 7850 + COUNT_WORDS  # logreg's parameters plus the masked example count


def _logreg(offset: float = 0.0) -> Weights:
    return {
        k: v + np.float32(offset)
        for k, v in get_weights(build_model(ModelSpec("logreg"), seed=0)).items()
    }


async def _session(coordinator: object, name: str) -> Session:
    return await asyncio.wait_for(coordinator.session_of(name), 90)  # type: ignore[attr-defined]


async def _shutdown(session: Session, worker: Proc) -> None:
    await session.send(pb.CoordinatorMessage(shutdown=pb.Shutdown(reason="test over")))
    assert await asyncio.to_thread(worker.wait, 60) == 0, worker.output


async def _refused(session: Session, task: pb.Task, weights: Weights, rule: str) -> str:
    task_id = await session.send_task(task, weights)
    message = await session.refusal(task_id)
    assert f"[{rule}]" in message, message
    return message


async def test_a_default_worker_runs_nothing_named_on_the_wire_and_keeps_secagg_sound(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    """A worker started as the README tells a data owner (no --model, no policy)."""
    async with hostile_coordinator() as (coordinator, port):
        worker = start_worker(
            procs, port, shards / "shard-0.npz", "victim", "--give-up-after", "60"
        )
        s = await _session(coordinator, "victim")
        w0 = _logreg()

        # Positive control: an honest fit runs and its update comes back.
        result, update = await s.outcome(await s.send_task(fit_task(), w0))
        assert isinstance(result, pb.TaskResult)
        assert result.num_examples == 400
        assert set(update) == set(w0)
        assert not np.array_equal(update["linear.bias"], w0["linear.bias"])

        # 1. Code execution: an import path in the plan is never imported.
        marker = tmp_path / "pwned"
        attack = fit_task("os:system", {"command": f"touch {marker}"})
        message = await _refused(s, attack, w0, "model.allowed")
        assert "not registered on this worker" in message
        await _refused(s, evaluate_task("os:system"), w0, "model.allowed")
        assert not marker.exists()

        # 2. A model too large to build, whatever the header says: measured on the meta
        #    device, refused before anything is allocated (2 TB would not fit).
        huge = fit_task("mnist-cnn", {"num_classes": 10**9})
        assert "bytes of parameters" in await _refused(s, huge, w0, "model.max-bytes")
        # ... and weights that do not fit the model named are refused before training.
        await _refused(s, fit_task("mnist-mlp"), w0, "model.weights")

        # 3. Training-config bounds: lr ~0 turns a fit into a query; NaN, epochs, batch size.
        await _refused(s, fit_task(learning_rate=1e-30), w0, "training.learning-rate")
        await _refused(s, fit_task(learning_rate=float("nan")), w0, "training.config")
        await _refused(s, fit_task(epochs=10**6), w0, "training.max-epochs")
        await _refused(s, fit_task(batch_size=10**9), w0, "training.max-batch-size")

        # 4. Distributed DP: the worker derives its noise share from z, C, m and its own
        #    policy; a stale noise field of 0 changes nothing. The default policy trusts no
        #    other silo (issue 22): share 1.0 * 0.01 / sqrt(min(4, 1)) = 0.01.
        extra = {"dp.clip_norm": 0.01, "dp.noise_multiplier": 1.0, "dp.min_updates": 4.0}
        result, update = await s.outcome(
            await s.send_task(fit_task(extra={**extra, "dp.noise_std": 0.0}), w0)
        )
        assert isinstance(result, pb.TaskResult)
        assert result.num_examples == 1
        assert result.update_kind == pb.UPDATE_KIND_DELTA
        flat = np.concatenate([a.ravel() for a in update.values()])
        assert np.std(flat) == pytest.approx(0.01, rel=0.1)

        # 5. The adaptive-clipping bit beside a masked update: refused, no keys made.
        setup = make_setup(SecAggParams(), 3, 400)
        bit = fit_task(secagg=setup, extra={"dp.clip_norm": 1.0, "dp.report_unclipped": 1.0})
        await _refused(s, bit, w0, "differential-privacy.report-unclipped")
        assert not s.secagg_seen

        # 6. Secure aggregation, positive control: an honest round of 3 completes and the
        #    worker answers the unmasking request.
        setup = make_setup(SecAggParams(clip=4.0), 3, 400)
        peers = FakePeers(setup, 3, WORDS)
        task_id = await s.send_task(fit_task(secagg=setup), w0)
        masked, _ = await peers.run_to_masked_input(s, task_id)
        assert isinstance(masked, pb.TaskResult), masked
        assert masked.update_kind == pb.UPDATE_KIND_MASKED
        assert masked.num_examples == 0
        answer = await peers.unmask(s, {1, 2, 3}, set())
        assert answer.WhichOneof("body") == "unmask"

        # 7. The retry attack: a second secure round over the same global weights (a fresh
        #    round id, one worker fewer) would isolate the missing worker's update.
        setup = make_setup(SecAggParams(clip=4.0), 3, 400)
        message = await _refused(s, fit_task(secagg=setup), w0, "secure-aggregation.once-per-model")
        assert "already sent a masked update" in message

        # 8. A threshold of half the group (t=2 of 4) would let two disjoint halves unmask.
        setup = make_setup(SecAggParams(threshold=2), 4, 400)
        s.secagg_seen.clear()
        outcome, _ = await FakePeers(setup, 4, WORDS).run_to_masked_input(
            s, await s.send_task(fit_task(secagg=setup), _logreg(0.1))
        )
        assert isinstance(outcome, pb.TaskError)
        assert outcome.code == pb.ERROR_CODE_REFUSED
        reasons = [m.abort.reason for m in s.secagg_seen if m.WhichOneof("body") == "abort"]
        assert any("threshold t=2 is not above 0.5 of the group of 4" in r for r in reasons)

        # 9. A group of two: the sum would give each member the other's update.
        setup = make_setup(SecAggParams(threshold=2), 2, 400)
        s.secagg_seen.clear()
        outcome, _ = await FakePeers(setup, 2, WORDS).run_to_masked_input(
            s, await s.send_task(fit_task(secagg=setup), _logreg(0.2))
        )
        assert isinstance(outcome, pb.TaskError)
        reasons = [m.abort.reason for m in s.secagg_seen if m.WhichOneof("body") == "abort"]
        assert any("sharing group has 2 member(s)" in r for r in reasons)

        # 10. Survivors padded with strangers (7, 8) to reach the threshold: only neighbours
        #     count, and one is not enough.
        setup = make_setup(SecAggParams(clip=4.0), 3, 400)
        peers = FakePeers(setup, 3, WORDS)
        masked, _ = await peers.run_to_masked_input(
            s, await s.send_task(fit_task(secagg=setup), _logreg(0.3))
        )
        assert isinstance(masked, pb.TaskResult)
        answer = await peers.unmask(s, {1, 7, 8}, {2, 3})
        assert answer.WhichOneof("body") == "abort"
        assert "only 1 survivors among this worker's group" in answer.abort.reason

        await _shutdown(s, worker)
    assert "Traceback" not in worker.output


POLICY = """\
[differential-privacy]
required = "client-level"

[budget]
study = "hostile"
epsilon = 20.0
delta = 1e-5
ledger = "ledger.json"
"""


def _charges(ledger: Path) -> list[dict[str, object]]:
    document = json.loads(ledger.read_text())
    return list(document["studies"]["hostile"]["charges"])


async def test_under_a_dp_budget_no_exact_statistic_leaves_the_worker(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    ledger = tmp_path / "ledger.json"
    async with hostile_coordinator() as (coordinator, port):
        worker = start_worker(
            procs, port, shards / "shard-1.npz", "silo", "--policy", str(policy),
            "--give-up-after", "60",
        )  # fmt: skip
        s = await _session(coordinator, "silo")
        w0 = _logreg()
        dp = {"dp.clip_norm": 0.1, "dp.noise_multiplier": 2.0}

        # Positive control: a DP round is charged, and its result carries no training loss
        # or accuracy (the exact statistics a learning rate of ~0 would turn into a query).
        result, update = await s.outcome(await s.send_task(fit_task(extra=dp), w0))
        assert isinstance(result, pb.TaskResult), result
        assert update
        assert not {"loss", "accuracy", "train_seconds"} & set(result.metrics)
        assert len(_charges(ledger)) == 1
        result, _ = await s.outcome(
            await s.send_task(fit_task(learning_rate=1e-6, extra=dp), _logreg(0.1))
        )
        assert isinstance(result, pb.TaskResult)
        assert "accuracy" not in result.metrics

        # The exact-share-of-class-k evaluation: refused, nothing charged or released.
        await _refused(s, evaluate_task(), crafted_eval_weights(3), "training.allow-evaluation")
        await _refused(s, fit_task(learning_rate=1e-30, extra=dp), w0, "training.learning-rate")
        # A huge "minimum update count" would shrink the worker's own noise share to nothing:
        # the worker charges what the coordinator sees (z / sqrt(m)), which the budget refuses.
        shrink = {**dp, "dp.min_updates": 1e6}
        await _refused(s, fit_task(extra=shrink), w0, "budget")
        assert len(_charges(ledger)) == 2  # only the two rounds that ran

        await _shutdown(s, worker)
    worker.signal(signal.SIGKILL)
