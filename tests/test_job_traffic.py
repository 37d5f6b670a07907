"""Bytes counted per job at the transport (issue 24): a query answered on a worker's stream
while a training job's task runs there counts in the query's job, never in the training
job's round; ended jobs leave nothing behind."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from test_coordinator import config

from fedcore.protocol import PROTOCOL_VERSION, STREAM_END
from fedcore.server.engine.context import RoundContext
from fedcore.server.jobs.service import job_info
from fedcore.server.jobs.store import JobStore
from fedcore.server.state.registry import SessionState, WorkerRegistry
from fedcore.server.transport.auth import Authenticator
from fedcore.server.transport.payloads import WeightsPayload
from fedcore.server.transport.service import CoordinatorService
from fedcore.server.transport.traffic import Traffic, TrafficCounters
from fedcore.v1 import fedcore_pb2 as pb


class _Context:
    """One Join stream in memory: what the worker sends is queued, what is written kept."""

    def __init__(self) -> None:
        self.inbound: asyncio.Queue[object] = asyncio.Queue()
        self.written: list[pb.CoordinatorMessage | bytes] = []
        #: Set on every write and every read: the service made progress.
        self.changed = asyncio.Event()
        #: The service handled everything pushed and waits for more.
        self.idle = False

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def auth_context(self) -> dict[str, Any]:
        return {}

    def push(self, message: object) -> None:
        """The worker sends ``message``."""
        self.idle = False
        self.inbound.put_nowait(message)

    async def read(self) -> object:
        self.idle = self.inbound.empty()  # everything pushed before was handled
        self.changed.set()
        return await self.inbound.get()

    async def write(self, message: pb.CoordinatorMessage | bytes) -> None:
        self.written.append(message)
        self.changed.set()

    async def until(self, condition: Any, what: str) -> None:
        """Wait (at most 10 s) until the service's progress makes ``condition()`` true."""
        async with asyncio.timeout(10):
            while not condition():
                self.changed.clear()
                await self.changed.wait()
        assert condition(), what

    async def abort(self, code: object, details: str) -> None:
        raise AssertionError(f"stream aborted: {details}")


def _size(message: pb.CoordinatorMessage | pb.WorkerMessage | bytes) -> int:
    return len(message) if isinstance(message, bytes) else message.ByteSize()


async def test_a_querys_bytes_on_the_stream_of_a_training_job_count_in_its_own_job() -> None:
    registry = WorkerRegistry()
    service = CoordinatorService(
        config(), registry, None, (), Authenticator(None, mutual_tls=False)
    )
    service.analytics_handler = lambda session, message: None  # a query runs on the network
    counters = service.counters
    train, query = counters.open("train-A"), counters.open("query-Q")
    stream = _Context()
    join = asyncio.create_task(service.join(None, stream))  # type: ignore[arg-type]
    stream.push(
        pb.WorkerMessage(
            hello=pb.Hello(name="silo-0", protocol_version=PROTOCOL_VERSION, num_examples=10)
        )
    )
    await stream.until(lambda: registry.by_name("silo-0") is not None, "the worker joined")
    session = registry.by_name("silo-0")
    assert session is not None
    await stream.until(lambda: session.state is SessionState.IDLE, "the session is active")
    welcome = stream.written[0]

    # The training job's task and weights, with the query's messages overtaking them.
    payload = WeightsPayload({"w": np.ones(3000, np.float32)}, chunk_bytes=4096)
    task = pb.CoordinatorMessage(
        task=pb.Task(task_id="t", job_id="train-A", weights=payload.header)
    )
    session.send(task)
    session.send(payload)
    ask = pb.CoordinatorMessage(
        analytics=pb.AnalyticsCoordinatorMessage(
            task=pb.QueryTask(query_id="q", job_id="query-Q"), job_id="query-Q"
        )
    )
    peers = pb.CoordinatorMessage(
        analytics=pb.AnalyticsCoordinatorMessage(
            secagg=pb.SecAggCoordinatorMessage(peers=pb.SecAggPeers(round_id="q")),
            job_id="query-Q",
        )
    )
    await stream.until(lambda: len(stream.written) >= 2, "the task is written")
    session.send_urgent(ask)
    session.send_urgent(peers)
    expected = 1 + 1 + payload.chunks + 2
    await stream.until(lambda: len(stream.written) == expected, "everything is written")
    # ... and the worker answers both: the query's acceptance, the training's secure keys.
    accept = pb.WorkerMessage(
        analytics=pb.AnalyticsWorkerMessage(
            accept=pb.QueryAccept(query_id="q", epsilon=0.5), job_id="query-Q"
        )
    )
    keys = pb.WorkerMessage(
        secagg=pb.SecAggWorkerMessage(keys=pb.SecAggKeys(round_id="r"), job_id="train-A")
    )
    heartbeat = pb.WorkerMessage(heartbeat=pb.Heartbeat(sequence=1))
    for message in (accept, keys, heartbeat):
        stream.push(message)
    received = _size(accept) + _size(keys) + _size(heartbeat)
    await stream.until(lambda: stream.idle, "everything is read")

    query_sent = _size(ask) + _size(peers)
    training_sent = sum(_size(m) for m in stream.written) - _size(welcome) - query_sent
    assert training_sent > 12_000  # the weights went (positive control: the harness counts)
    assert (train.bytes_sent, train.bytes_received) == (training_sent, _size(keys))
    assert (query.bytes_sent, query.bytes_received) == (query_sent, _size(accept))
    # The totals hold everything after the handshake, the network's own heartbeat too.
    assert counters.bytes_sent == training_sent + query_sent
    assert counters.bytes_received == received

    # A round of the training job counts its job's bytes: the query is not in it.
    context = RoundContext(config(), None, {}, service, None, job_id="train-A")  # type: ignore[arg-type]
    assert context.counters is train
    stream.push(STREAM_END)  # the worker hangs up
    await asyncio.wait_for(join, 10)


def test_a_job_id_nobody_runs_counts_in_the_totals_only_and_ended_jobs_leave_nothing() -> None:
    counters = TrafficCounters()
    live = counters.open("a")
    counters.count("a", sent=10, received=3)
    counters.count("stale", sent=5)  # a job not running (or a hostile worker's claim)
    counters.count("", received=7)
    assert (live.bytes_sent, live.bytes_received) == (10, 3)
    assert (counters.bytes_sent, counters.bytes_received) == (15, 10)
    assert counters.of_job("stale") is None
    assert counters.close("a") == Traffic(10, 3)
    assert counters.jobs == {}
    counters.count("a", sent=1)  # after its end (its JobEnd): totals only
    assert counters.of_job("a") is None


def test_fed_job_status_shows_a_jobs_bytes_live_then_from_its_result(tmp_path: Any) -> None:
    store = JobStore(tmp_path / "jobs.db")
    record = store.submit(study="s", scientist="a", kind="train", settings={}, rounds=1)
    info = job_info(record, Traffic(123, 45))
    assert (info.bytes_sent, info.bytes_received) == (123, 45)
    store.set_result(record.id, '{"rows": 1, "bytes": {"sent": 7, "received": 8}}')
    store.set_state(record.id, "completed", "done")
    info = job_info(store.get(record.id))
    assert (info.bytes_sent, info.bytes_received) == (7, 8)
    store.close()
