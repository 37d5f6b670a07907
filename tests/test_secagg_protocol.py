"""Secure aggregation through the real gRPC protocol, in-process: exact weighted FedAvg,
dropouts, and refusals."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from test_coordinator import TIMEOUT, ScriptedTrainer, config, initial_weights, run_worker

from fedcore.errors import ConfigError
from fedcore.secagg import SecAggParams
from fedcore.server import Coordinator
from fedcore.strategy import FedAvg
from fedcore.worker import TrainingFailed, Worker

SECAGG = SecAggParams(clip=4.0, bits=24, phase_timeout=5.0)


async def test_secure_fedavg_matches_plain_fedavg(coordinator_factory: Any) -> None:
    coordinator, task = await coordinator_factory(config(rounds=2, min_workers=3, secagg=SECAGG))
    trainers = [ScriptedTrainer(1.0, 30), ScriptedTrainer(-0.5, 10), ScriptedTrainer(2.0, 20)]
    await asyncio.gather(
        *(run_worker(coordinator.port, f"w{i}", t) for i, t in enumerate(trainers))
    )
    result = await asyncio.wait_for(task, TIMEOUT)
    mean_offset = (1.0 * 30 - 0.5 * 10 + 2.0 * 20) / 60
    step = SECAGG.clip / (2 ** (SECAGG.bits - 1) - 1)
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(
            result.weights[name], w0 + 2 * mean_offset, rtol=0, atol=4 * step
        )
    assert [r.workers for r in result.rounds] == [3, 3]


async def test_strategy_needing_individual_updates_is_refused() -> None:
    class Robust(FedAvg):
        needs_individual_updates = True

    with pytest.raises(ConfigError, match=r"needs every worker's individual update"):
        Coordinator(config(secagg=SECAGG), strategy=Robust())


async def test_worker_lost_before_masking_is_survived(coordinator_factory: Any) -> None:
    coordinator, task = await coordinator_factory(
        config(rounds=1, min_workers=4, min_results=2, secagg=SECAGG)
    )

    class Crashing(ScriptedTrainer):
        def fit(self, *args: Any) -> Any:
            raise TrainingFailed("disk on fire")

    good = [ScriptedTrainer(1.0, 10), ScriptedTrainer(3.0, 30), ScriptedTrainer(2.0, 20)]
    crashing = Worker(f"127.0.0.1:{coordinator.port}", "crash", Crashing(0, 5), give_up_after=5)
    runs = [run_worker(coordinator.port, f"w{i}", t) for i, t in enumerate(good)]
    crash = asyncio.create_task(crashing.run())
    await asyncio.gather(*runs)
    result = await asyncio.wait_for(task, TIMEOUT)
    crash.cancel()
    expected = (1.0 * 10 + 3.0 * 30 + 2.0 * 20) / 60
    step = SECAGG.clip / (2 ** (SECAGG.bits - 1) - 1)
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(result.weights[name], w0 + expected, rtol=0, atol=4 * step)
    assert result.rounds[0].workers == 3
    assert result.rounds[0].failures == 1


def test_cli_flags_and_toml_turn_secure_aggregation_on(tmp_path: Any) -> None:
    from fedcore.cli_support import parse_args_with_config
    from fedcore.server.cli import build_parser, config_from_args

    plain = config_from_args(build_parser().parse_args([]))
    assert plain.secagg is None
    toml = tmp_path / "f.toml"
    toml.write_text("secagg = true\nsecagg-neighbours = 6\nsecagg-clip = 0.5\n")
    args = parse_args_with_config(
        build_parser(),
        # Round 1 starts with --min-workers workers: at least the threshold t.
        [
            "--config",
            str(toml),
            "--secagg-threshold",
            "3",
            "--secagg-bits",
            "20",
            "--min-workers",
            "3",
        ],
    )
    assert config_from_args(args).secagg == SecAggParams(
        threshold=3, neighbours=6, bits=20, clip=0.5
    )
    with pytest.raises(ConfigError, match="secagg-threshold"):
        config_from_args(build_parser().parse_args(["--secagg", "--secagg-threshold", "1"]))


async def test_worker_runtime_refuses_a_greedy_unmasking_request_on_the_wire() -> None:
    """The worker's stream glue, driven by a hand-written hostile coordinator: asked for both
    shares of a peer, it answers with an abort, not with shares."""
    from fedcore.secagg import SecAggClient, wire
    from fedcore.secagg.server import SecAggServer
    from fedcore.secagg.setup import make_setup
    from fedcore.v1 import fedcore_pb2 as pb
    from fedcore.worker.secagg import SecAggRounds

    setup = make_setup(SecAggParams(), 3, 30)
    sent: list[pb.WorkerMessage] = []

    async def send(message: pb.WorkerMessage) -> None:
        sent.append(message)

    rounds = SecAggRounds(send, "victim")
    await rounds.start(pb.Task(round=1, secagg=wire.setup_to_proto(setup)))
    peers = {2: SecAggClient(setup), 3: SecAggClient(setup)}
    server = SecAggServer(setup, 3, 10)
    server.add_keys(1, wire.keys_from_proto(sent[-1].secagg.keys))
    for u, c in peers.items():
        server.add_keys(u, c.advertise())
    directories = server.close_keys()
    rid = setup.round_id
    await rounds.handle(
        pb.SecAggCoordinatorMessage(peers=wire.directory_to_proto(rid, directories[1]))
    )
    server.add_shares(1, wire.shares_from_proto(sent[-1].secagg.shares))
    for u, c in peers.items():
        server.add_shares(u, c.share_keys(directories[u]))
    inboxes = server.close_shares()
    await rounds.handle(pb.SecAggCoordinatorMessage(shares=wire.shares_to_proto(rid, inboxes[1])))
    task = pb.Task(round=1, secagg=wire.setup_to_proto(setup))
    weights = {"w": np.zeros(8, np.float32)}
    await rounds.mask(task, weights, weights, is_delta=False, examples=10)
    greedy = pb.SecAggUnmaskRequest(round_id=rid, survivors=[1, 2, 3], dropped=[3])
    await rounds.handle(pb.SecAggCoordinatorMessage(unmask=greedy))
    last = sent[-1].secagg
    assert last.WhichOneof("body") == "abort"
    assert "asked for both shares of worker(s) [3]" in last.abort.reason
    assert not any(m.secagg.WhichOneof("body") == "unmask" for m in sent)


@pytest.mark.parametrize("silent_after", ["task", "keys"])
async def test_a_silent_worker_times_out_its_phase_and_the_round_completes(
    coordinator_factory: Any, silent_after: str
) -> None:
    """A worker that goes quiet in phase 1 (no keys) or phase 2 (keys, then no shares) is
    dropped when the phase timeout expires; the others' aggregate is exact."""
    from raw_client import RawClient

    params = SecAggParams(clip=4.0, bits=24, phase_timeout=1.0)
    coordinator, task = await coordinator_factory(
        config(rounds=1, min_workers=4, min_results=3, secagg=params)
    )
    silent = RawClient(coordinator.port)
    try:
        await _stay_silent(coordinator, task, silent, silent_after, params)
    finally:
        await silent.close()


async def _stay_silent(
    coordinator: Any, task: Any, silent: Any, silent_after: str, params: SecAggParams
) -> None:
    from fedcore.secagg import SecAggClient, wire
    from fedcore.v1 import fedcore_pb2 as pb

    await silent.hello("silent", capabilities=["fit", "secagg-v1"])
    honest = asyncio.gather(
        *(
            run_worker(coordinator.port, f"w{i}", ScriptedTrainer(float(i), 10 * (i + 1)))
            for i in range(3)
        )
    )
    task_msg, _ = await silent.receive_task()
    assert task_msg.HasField("secagg")
    if silent_after == "keys":
        client = SecAggClient(wire.setup_from_proto(task_msg.secagg))
        keys = wire.keys_to_proto(task_msg.secagg.round_id, client.advertise())
        await silent.send(pb.WorkerMessage(secagg=pb.SecAggWorkerMessage(keys=keys)))
    result = await asyncio.wait_for(task, TIMEOUT)
    await honest
    expected = (0.0 * 10 + 1.0 * 20 + 2.0 * 30) / 60
    step = params.clip / (2 ** (params.bits - 1) - 1)
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(result.weights[name], w0 + expected, rtol=0, atol=4 * step)
    assert result.rounds[0].workers == 3
    assert result.rounds[0].failures == 1


async def test_below_threshold_the_round_fails_cleanly_and_keeps_the_model(
    coordinator_factory: Any,
) -> None:
    from fedcore.errors import RoundFailedError

    params = SecAggParams(threshold=3, phase_timeout=2.0)
    coordinator, task = await coordinator_factory(
        config(rounds=1, min_workers=3, min_results=2, round_retries=0, secagg=params)
    )

    class Crashing(ScriptedTrainer):
        def fit(self, *args: Any) -> Any:
            raise TrainingFailed("out of memory")

    workers = [
        asyncio.create_task(run_worker(coordinator.port, "a", ScriptedTrainer(1.0, 10))),
        asyncio.create_task(run_worker(coordinator.port, "b", ScriptedTrainer(2.0, 10))),
        asyncio.create_task(run_worker(coordinator.port, "c", Crashing(0.0, 10))),
    ]
    with pytest.raises(RoundFailedError, match="round 1 failed 1 time:"):
        await asyncio.wait_for(task, TIMEOUT)
    for name, w0 in initial_weights().items():
        np.testing.assert_array_equal(coordinator.weights[name], w0)
    await asyncio.wait_for(asyncio.gather(*workers, return_exceptions=True), TIMEOUT)
