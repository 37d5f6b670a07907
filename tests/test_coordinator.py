"""The coordinator in-process: exact FedAvg through the real protocol, handshake refusals,
hostile and malformed input, retries. Workers are real `Worker` objects or raw gRPC clients."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedcore.codec import make_header, signature_specs
from fedcore.errors import RejectedError, RoundFailedError
from fedcore.models import build_model, get_weights
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.protocol import PROTOCOL_VERSION
from fedcore.server import ServerConfig
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights, signature_of
from fedcore.worker import EvalOutput, FitOutput, Trainer, Worker

MODEL = ModelSpec("logreg")
TIMEOUT = 60


class ScriptedTrainer(Trainer):
    """Returns received weights + ``offset`` with a fixed example count: exact expectations."""

    def __init__(self, offset: float, examples: int) -> None:
        self.offset = offset
        self.examples = examples
        self.rounds_seen = 0

    @property
    def num_examples(self) -> int:
        return self.examples

    def fit(self, model: ModelSpec, weights: Weights, config: TrainConfig) -> FitOutput:
        self.rounds_seen += 1
        return FitOutput(
            {k: v + np.asarray(self.offset, v.dtype) for k, v in weights.items()}, self.examples
        )

    def evaluate(self, model: ModelSpec, weights: Weights) -> EvalOutput:
        return EvalOutput(self.examples, {"accuracy": 0.5, "loss": 1.0})


def config(**kw: Any) -> ServerConfig:
    base: dict[str, Any] = dict(
        model=MODEL,
        listen="127.0.0.1:0",
        rounds=2,
        min_workers=2,
        round_timeout=30,
        heartbeat_interval=0.5,
        heartbeat_timeout=10,
        fed_eval_every=0,
        join_timeout=TIMEOUT,
    )
    base.update(kw)
    return ServerConfig.from_flags(**base)


def initial_weights() -> Weights:
    return get_weights(build_model(MODEL, seed=0))


async def run_worker(port: int, name: str, trainer: Trainer) -> Worker:
    worker = Worker(f"127.0.0.1:{port}", name, trainer, backoff_initial=0.05, give_up_after=TIMEOUT)
    await asyncio.wait_for(worker.run(), TIMEOUT)
    return worker


async def test_fedavg_through_the_protocol_is_exact(coordinator_factory: Any) -> None:
    coordinator, task = await coordinator_factory(config(rounds=2))
    a, b = ScriptedTrainer(1.0, 30), ScriptedTrainer(-0.5, 10)
    await asyncio.gather(run_worker(coordinator.port, "a", a), run_worker(coordinator.port, "b", b))
    result = await asyncio.wait_for(task, TIMEOUT)
    mean_offset = (1.0 * 30 - 0.5 * 10) / 40
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(result.weights[name], w0 + 2 * mean_offset, rtol=0, atol=1e-6)
    assert [r.workers for r in result.rounds] == [2, 2]
    assert a.rounds_seen == b.rounds_seen == 2
    assert all(
        r.bytes_sent > 2 * 7850 * 4 and r.bytes_received > 2 * 7850 * 4 for r in result.rounds
    )


async def test_federated_evaluation_is_weighted(coordinator_factory: Any) -> None:
    coordinator, task = await coordinator_factory(config(rounds=1, fed_eval_every=1))

    class Evaluating(ScriptedTrainer):
        def evaluate(self, model: ModelSpec, weights: Weights) -> EvalOutput:
            return EvalOutput(self.examples, {"accuracy": self.offset})

    await asyncio.gather(
        run_worker(coordinator.port, "a", Evaluating(0.9, 30)),
        run_worker(coordinator.port, "b", Evaluating(0.5, 10)),
    )
    result = await asyncio.wait_for(task, TIMEOUT)
    assert result.rounds[0].federated["accuracy"] == pytest.approx((0.9 * 30 + 0.5 * 10) / 40)


@pytest.mark.parametrize(
    ("hello_fields", "code", "message"),
    [
        (
            {"protocol_version": 99},
            grpc.StatusCode.FAILED_PRECONDITION,
            "speaks fedcore protocol v99",
        ),
        (
            {"name": "bad name!"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "worker name 'bad name!' is invalid",
        ),
        (
            {"model": pb.ModelSpec(name="mnist-mlp")},
            grpc.StatusCode.FAILED_PRECONDITION,
            "uses model mnist-mlp, the federation runs logreg",
        ),
    ],
)
async def test_handshake_refusals(
    coordinator_factory: Any,
    raw_clients: Any,
    hello_fields: dict[str, Any],
    code: grpc.StatusCode,
    message: str,
) -> None:
    coordinator, _ = await coordinator_factory(config())
    client = raw_clients(coordinator.port)
    fields = {"name": "w", **hello_fields}
    hello = pb.Hello(
        num_examples=1, protocol_version=fields.pop("protocol_version", PROTOCOL_VERSION), **fields
    )
    await client.send(pb.WorkerMessage(hello=hello))
    got_code, details = await client.final_status()
    assert got_code == code
    assert message in details
    assert len(coordinator.registry) == 0


async def test_signature_mismatch_is_explained(coordinator_factory: Any, raw_clients: Any) -> None:
    coordinator, _ = await coordinator_factory(config())
    wrong = signature_of(get_weights(build_model(ModelSpec("logreg", {"num_classes": 5}))))
    client = raw_clients(coordinator.port)
    await client.send(
        pb.WorkerMessage(
            hello=pb.Hello(
                name="w",
                protocol_version=PROTOCOL_VERSION,
                num_examples=1,
                model=pb.ModelSpec(name="logreg"),
                model_signature=signature_specs(wrong),
            )
        )
    )
    code, details = await client.final_status()
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "'linear.weight' is float32[5, 784], expected float32[10, 784]" in details


async def test_first_message_must_be_hello_and_names_are_unique(
    coordinator_factory: Any, raw_clients: Any
) -> None:
    coordinator, _ = await coordinator_factory(config())
    first = raw_clients(coordinator.port)
    await first.send(pb.WorkerMessage(heartbeat=pb.Heartbeat(sequence=1)))
    assert await first.final_status() == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "the first message must be a Hello",
    )

    holder = raw_clients(coordinator.port)
    assert (await holder.hello("same")).WhichOneof("body") == "welcome"
    thief = raw_clients(coordinator.port)
    await thief.send(
        pb.WorkerMessage(hello=pb.Hello(name="same", protocol_version=PROTOCOL_VERSION))
    )
    code, details = await thief.final_status()
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert "already connected" in details
    assert [w.name for w in coordinator.workers] == ["same"]


async def test_garbage_and_oversized_messages_leave_the_coordinator_serving(
    coordinator_factory: Any, raw_clients: Any
) -> None:
    coordinator, _ = await coordinator_factory(config(chunk_bytes=4096))
    garbage = raw_clients(coordinator.port)
    await garbage.send(b"\xff\xff\xff\xff not protobuf")
    code, _ = await garbage.final_status()
    assert code != grpc.StatusCode.OK

    huge = raw_clients(coordinator.port)
    await huge.hello("huge")
    blob = pb.WorkerMessage(chunk=pb.PayloadChunk(index=0, data=b"\0" * (3 << 20)))
    with contextlib.suppress(grpc.aio.AioRpcError):
        await huge.send(blob)
    code, _ = await huge.final_status()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED

    async with grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(
            health_pb2.HealthCheckRequest(service="fedcore.v1.Coordinator"), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    ok = raw_clients(coordinator.port)
    assert (await ok.hello("fine")).WhichOneof("body") == "welcome"


async def test_poisoned_and_lying_updates_are_never_aggregated(
    coordinator_factory: Any, raw_clients: Any
) -> None:
    """Honest workers' average must come out exactly, whatever the hostile ones send."""
    coordinator, task = await coordinator_factory(config(rounds=1, min_workers=4))
    nan_sender, liar, replayer = (raw_clients(coordinator.port) for _ in range(3))
    for i, c in enumerate((nan_sender, liar, replayer)):
        await c.hello(f"hostile-{i}")
    honest = asyncio.gather(
        run_worker(coordinator.port, "a", ScriptedTrainer(1.0, 10)),
        run_worker(coordinator.port, "b", ScriptedTrainer(3.0, 10)),
    )
    (t1, w1), (t2, w2), (_t3, _w3) = [await c.receive_task() for c in (nan_sender, liar, replayer)]

    poisoned = {k: v.copy() for k, v in w1.items()}
    poisoned["linear.bias"][3] = np.nan
    await nan_sender.send_update(t1.task_id, poisoned)
    # A header whose declared size disagrees with its tensors.
    header = make_header(w2, 1024)
    header.total_bytes += 4
    await liar.send(
        pb.WorkerMessage(
            result=pb.TaskResult(
                task_id=t2.task_id,
                num_examples=10,
                update=header,
                update_kind=pb.UPDATE_KIND_WEIGHTS,
            )
        )
    )
    # A result for a task it was never given.
    await replayer.send(
        pb.WorkerMessage(result=pb.TaskResult(task_id="not-a-task", num_examples=10))
    )

    statuses = [await c.final_status() for c in (nan_sender, liar, replayer)]
    assert statuses[0][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "'linear.bias' contains NaN or Inf" in statuses[0][1]
    assert statuses[1][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "declares" in statuses[1][1]
    assert statuses[2] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "result for task 'not-a-task', which this worker was not given",
    )
    # At most 2 valid results < min_workers=4: no round can complete, and none of the hostile
    # updates may have touched the global model.
    for name, w0 in initial_weights().items():
        np.testing.assert_array_equal(coordinator.weights[name], w0)
    coordinator.stop()
    await asyncio.wait_for(task, TIMEOUT)
    honest.cancel()
    with contextlib.suppress(BaseException):
        await honest


async def test_hostile_update_does_not_change_the_honest_average(
    coordinator_factory: Any, raw_clients: Any
) -> None:
    coordinator, task = await coordinator_factory(config(rounds=1, min_workers=3))
    hostile = raw_clients(coordinator.port)
    await hostile.hello("hostile")
    honest = asyncio.gather(
        run_worker(coordinator.port, "a", ScriptedTrainer(1.0, 10)),
        run_worker(coordinator.port, "b", ScriptedTrainer(3.0, 30)),
    )
    task_msg, weights = await hostile.receive_task()
    weights = {k: v.copy() for k, v in weights.items()}
    # In the last chunk: the coordinator refuses a streamed update at the bad chunk, and a
    # refusal while this raw client is still writing reaches it as gRPC's local "Internal
    # error from Core" instead of the coordinator's status (a race of the harness).
    last = list(weights)[-1]
    weights[last].reshape(-1)[-1] = np.inf
    await hostile.send_update(task_msg.task_id, weights, examples=10**9)
    code, details = await hostile.final_status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    # min_workers=3 cannot be met any more; a worker rejoins under another name to finish.
    late = asyncio.create_task(run_worker(coordinator.port, "c", ScriptedTrainer(2.0, 20)))
    result = await asyncio.wait_for(task, TIMEOUT)
    await honest
    await late
    expected_offset = (1.0 * 10 + 3.0 * 30 + 2.0 * 20) / 60
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(result.weights[name], w0 + expected_offset, atol=1e-6)
    assert result.rounds[0].attempts == 2


async def test_round_that_cannot_complete_fails_cleanly_and_keeps_the_model(
    coordinator_factory: Any, raw_clients: Any
) -> None:
    coordinator, task = await coordinator_factory(
        config(rounds=1, min_workers=1, round_timeout=1.0, round_retries=1)
    )
    silent = raw_clients(coordinator.port)
    await silent.hello("silent")  # takes its task and never answers
    with pytest.raises(RoundFailedError, match="round 1 failed 2 times"):
        await asyncio.wait_for(task, TIMEOUT)
    for name, w0 in initial_weights().items():
        np.testing.assert_array_equal(coordinator.weights[name], w0)


async def test_worker_with_wrong_model_is_rejected_for_good(coordinator_factory: Any) -> None:
    from fedcore.data import ArrayDataset
    from fedcore.worker import TorchTrainer

    coordinator, _ = await coordinator_factory(config())
    trainer = TorchTrainer(
        ArrayDataset(np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.int64)),
        model=ModelSpec("mnist-mlp"),
    )
    with pytest.raises(RejectedError, match="uses model mnist-mlp, the federation runs logreg"):
        await run_worker(coordinator.port, "wrong", trainer)


async def test_models_far_above_the_grpc_message_limit_go_through(coordinator_factory: Any) -> None:
    """12 MB of weights (3x gRPC's default 4 MB message limit) in 1 MiB chunks, both ways."""
    size = 3_000_000
    coordinator, task = await coordinator_factory(
        config(model=ModelSpec("vector", {"size": size}), rounds=1, chunk_bytes=1 << 20)
    )
    await asyncio.gather(
        run_worker(coordinator.port, "a", ScriptedTrainer(2.0, 1)),
        run_worker(coordinator.port, "b", ScriptedTrainer(4.0, 3)),
    )
    result = await asyncio.wait_for(task, TIMEOUT)
    np.testing.assert_array_equal(result.weights["weight"], np.full(size, 3.5, np.float32))
    assert result.rounds[0].bytes_received > 2 * 4 * size


async def test_a_trainer_that_crashes_is_reported_at_once(coordinator_factory: Any) -> None:
    """A user trainer's bug becomes a TaskError: the round does not wait for its timeout."""

    class Crashing(ScriptedTrainer):
        def fit(self, model: ModelSpec, weights: Weights, config: TrainConfig) -> FitOutput:
            raise RuntimeError("boom")

    coordinator, task = await coordinator_factory(
        config(rounds=1, min_workers=2, min_results=1, round_timeout=600)
    )
    workers = asyncio.gather(
        run_worker(coordinator.port, "good", ScriptedTrainer(1.0, 10)),
        run_worker(coordinator.port, "crashing", Crashing(0.0, 10)),
    )
    result = await asyncio.wait_for(task, 30)
    await workers
    assert result.rounds[0].workers == 1
    assert result.rounds[0].failures == 1


async def test_a_stalled_upload_cannot_block_the_others(
    coordinator_factory: Any, raw_clients: Any
) -> None:
    """A worker that starts an upload and goes quiet (half-dead connection) holds the only
    upload slot; the watchdog drops it and the honest upload goes through."""
    coordinator, task = await coordinator_factory(
        config(rounds=1, min_workers=2, min_results=1, upload_idle_timeout=1.0, round_timeout=60)
    )
    staller = raw_clients(coordinator.port)
    await staller.hello("staller")
    honest = asyncio.create_task(run_worker(coordinator.port, "honest", ScriptedTrainer(1.0, 10)))
    task_msg, weights = await staller.receive_task()
    header = make_header(weights, 1024)
    result = pb.TaskResult(
        task_id=task_msg.task_id, num_examples=10, update=header, update_kind=pb.UPDATE_KIND_WEIGHTS
    )
    await staller.send(pb.WorkerMessage(result=result))  # takes the slot, then sends nothing
    outcome = await asyncio.wait_for(task, 30)
    await honest
    assert outcome.rounds[0].workers == 1
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(outcome.weights[name], w0 + 1.0, atol=1e-6)
