"""Participation that cannot be replayed: a real ``fed-worker`` with a participation record
refuses a second secure round over a model one ulp away from one it already masked an update
for, and still refuses after it is killed and restarted; a model that really moved is the
positive control, before and after the restart. Plus the record's own rules, in memory."""

from __future__ import annotations

import asyncio
import json
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import Proc, start_worker
from hostile import FakePeers, Session, fit_task, hostile_coordinator

from fedcore.errors import ConfigError, SecAggRefusedError
from fedcore.models import build_model, get_weights
from fedcore.plan import ModelSpec
from fedcore.secagg import SecAggParams
from fedcore.secagg.messages import RoundSetup
from fedcore.secagg.participation import ParticipationLog
from fedcore.secagg.quantize import COUNT_WORDS
from fedcore.secagg.setup import make_setup
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights

WORDS = 7850 + COUNT_WORDS


def _logreg(offset: float) -> Weights:
    return {
        k: v + np.float32(offset)
        for k, v in get_weights(build_model(ModelSpec("logreg"), seed=0)).items()
    }


def _one_ulp(weights: Weights, index: int) -> Weights:
    out = {k: v.copy() for k, v in weights.items()}
    flat = out["linear.weight"].reshape(-1)
    flat[index] = np.nextafter(flat[index], np.float32(np.inf))
    return out


async def _round(s: Session, weights: Weights) -> tuple[pb.TaskResult | pb.TaskError, list[str]]:
    setup = make_setup(SecAggParams(clip=4.0), 3, 400)
    s.secagg_seen.clear()
    peers = FakePeers(setup, 3, WORDS)
    outcome, _ = await peers.run_to_masked_input(
        s, await s.send_task(fit_task(secagg=setup), weights)
    )
    reasons = [m.abort.reason for m in s.secagg_seen if m.WhichOneof("body") == "abort"]
    return outcome, reasons


@pytest.mark.slow
async def test_a_retry_one_ulp_away_is_refused_also_after_a_restart(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    record = tmp_path / "participation.json"
    flags = ("--give-up-after", "60", "--secagg-participation", str(record))
    w0 = _logreg(0.0)
    async with hostile_coordinator() as (coordinator, port):
        worker = start_worker(procs, port, shards / "shard-0.npz", "victim", *flags)
        s = await asyncio.wait_for(coordinator.session_of("victim"), 90)
        # Positive control: the first secure round over w0 sends its masked input.
        outcome, _ = await _round(s, w0)
        assert isinstance(outcome, pb.TaskResult), outcome
        assert record.exists()
        # The retry over w0 moved by one ulp in one weight: new bytes (the exact-bytes rule
        # lets it through), the same model: refused before anything is masked.
        outcome, reasons = await _round(s, _one_ulp(w0, 0))
        assert isinstance(outcome, pb.TaskError), outcome
        assert outcome.code == pb.ERROR_CODE_REFUSED
        assert "nearly unchanged model" in outcome.message
        assert any("nearly unchanged model" in r for r in reasons)

        worker.signal(signal.SIGKILL)
        await asyncio.to_thread(worker.wait, 30)
        coordinator.sessions.pop("victim")
        worker = start_worker(procs, port, shards / "shard-0.npz", "victim", *flags)
        s = await asyncio.wait_for(coordinator.session_of("victim"), 90)
        # After the restart: another ulp elsewhere is still refused ...
        outcome, _ = await _round(s, _one_ulp(w0, 1234))
        assert isinstance(outcome, pb.TaskError), outcome
        assert "nearly unchanged model" in outcome.message
        # ... and a model that moved is accepted (the control after the restart).
        outcome, _ = await _round(s, _logreg(0.05))
        assert isinstance(outcome, pb.TaskResult), outcome

        await s.send(pb.CoordinatorMessage(shutdown=pb.Shutdown(reason="test over")))
        assert await asyncio.to_thread(worker.wait, 60) == 0, worker.output
    assert "Traceback" not in worker.output


def test_the_record_keys_signed_rounds_and_survives_reloading(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    log = ParticipationLog(path, min_distance=1e-4)
    params = SecAggParams(signed=True)
    members = ["a", "b", "c"]
    model = np.random.default_rng(0).normal(size=10_000).astype(np.float32)

    def setup(round_number: int) -> RoundSetup:
        return make_setup(params, 3, 10, members=members, job="j", round_number=round_number)

    log.admit(setup(1), model, distributed_dp=False)
    far = model + np.float32(0.1)
    reloaded = ParticipationLog(path, min_distance=1e-4)
    assert len(reloaded) == 1
    with pytest.raises(SecAggRefusedError, match="already contributed to round 1 of job 'j'"):
        reloaded.admit(setup(1), far, distributed_dp=False)
    near = model * np.float32(1 + 1e-6)
    with pytest.raises(SecAggRefusedError, match="nearly unchanged"):
        reloaded.admit(setup(2), near, distributed_dp=False)
    # With distributed DP and a policy that allows it, the repeat is a fresh noisy release.
    lenient = ParticipationLog(path, min_distance=1e-4, allow_with_dp=True)
    lenient.admit(setup(2), near, distributed_dp=True)
    with pytest.raises(SecAggRefusedError, match="nearly unchanged"):
        lenient.admit(setup(3), near, distributed_dp=False)
    # A moved model is fine.
    ParticipationLog(path, min_distance=1e-4).admit(setup(4), far, distributed_dp=False)
    # A damaged record is never silently replaced.
    path.write_text("{")
    with pytest.raises(ConfigError, match="participation record"):
        ParticipationLog(path, min_distance=1e-4)


def test_the_study_is_part_of_the_key_but_not_of_the_model_rule(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    members = ["a", "b", "c"]
    rng = np.random.default_rng(1)
    model = rng.normal(size=10_000).astype(np.float32)
    other = rng.normal(size=10_000).astype(np.float32)

    def setup(round_number: int) -> RoundSetup:
        return make_setup(
            SecAggParams(signed=True), 3, 10, members=members, job="j", round_number=round_number
        )

    ParticipationLog(path, study="heart", min_distance=1e-4).admit(
        setup(1), model, distributed_dp=False
    )
    # The same (job, round) in another study is another round (a far model: the control) ...
    lungs = ParticipationLog(path, study="lungs", min_distance=1e-4)
    lungs.admit(setup(1), other, distributed_dp=False)
    with pytest.raises(SecAggRefusedError, match="round 1 of job 'j' in study 'lungs'"):
        lungs.admit(setup(1), other + np.float32(1.0), distributed_dp=False)
    # ... but renaming the study does not make a near-identical model new.
    kidneys = ParticipationLog(path, study="kidneys", min_distance=1e-4)
    near = model.copy()
    near[0] = np.nextafter(near[0], np.float32(np.inf))
    with pytest.raises(SecAggRefusedError, match="nearly unchanged"):
        kidneys.admit(setup(2), near, distributed_dp=False)
    # A query's round has no model: recorded by its key alone.
    kidneys.admit(setup(3), None, distributed_dp=True)
    with pytest.raises(SecAggRefusedError, match="round 3 of job 'j'"):
        ParticipationLog(path, study="kidneys", min_distance=1e-4).admit(
            setup(3), None, distributed_dp=True
        )


def test_a_version_1_record_is_migrated_to_hold_for_every_study(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    model = np.random.default_rng(2).normal(size=1000).astype(np.float32)
    setup = make_setup(SecAggParams(signed=True), 3, 10, members=["a", "b", "c"], job="j")
    ParticipationLog(path, min_distance=1e-4).admit(setup, model, distributed_dp=False)
    # Rewrite it as the previous fedcore did: version 1, entries without a study.
    document = json.loads(path.read_text())
    document["version"] = 1
    for entry in document["contributions"]:
        del entry["study"]
    path.write_text(json.dumps(document))
    for study in ("", "any-study"):
        with pytest.raises(SecAggRefusedError, match="already contributed to round 0 of job"):
            ParticipationLog(path, study=study, min_distance=1e-4).admit(
                setup, model + np.float32(1.0), distributed_dp=False
            )
    # Written back as version 2 on the next contribution, the old entry still for every study.
    log = ParticipationLog(path, study="s", min_distance=1e-4)
    log.admit(replace(setup, job="k"), model + np.float32(1.0), distributed_dp=False)
    assert json.loads(path.read_text())["version"] == 2
    with pytest.raises(SecAggRefusedError, match="round 0 of job 'j'"):
        ParticipationLog(path, study="t", min_distance=1e-4).admit(
            setup, model + np.float32(2.0), distributed_dp=False
        )
    # A record from a newer fedcore is refused clearly, never overwritten.
    document = json.loads(path.read_text())
    document["version"] = 3
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match="version 3, this fedcore reads versions up to 2"):
        ParticipationLog(path, min_distance=1e-4)
