"""A hostile coordinator: a small scripted gRPC server speaking fedcore v1 (the generated stubs
and the codec, not fed-server), so tests can send real ``fed-worker`` processes what an
attacker running the coordinator would send, and read exactly what comes back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np

from fedcore.codec import (
    PayloadAssembler,
    iter_chunks,
    make_header,
)
from fedcore.protocol import PROTOCOL_VERSION
from fedcore.secagg import SecAggClient, wire
from fedcore.secagg.client import ClientRules
from fedcore.secagg.identity import SiloIdentity
from fedcore.secagg.messages import RoundSetup, UnmaskRequest
from fedcore.secagg.server import SecAggServer
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.v1 import fedcore_pb2_grpc as pb_grpc
from fedcore.weights import Weights

CHUNK = 64 * 1024
TIMEOUT = 60.0


class Session:
    """One worker's stream, driven by the test."""

    def __init__(self, hello: pb.Hello) -> None:
        self.hello = hello
        self.inbox: asyncio.Queue[pb.WorkerMessage | None] = asyncio.Queue()
        self.outbox: asyncio.Queue[pb.CoordinatorMessage | None] = asyncio.Queue()
        self.secagg_seen: list[pb.SecAggWorkerMessage] = []
        self._unread: list[pb.WorkerMessage] = []

    def unread(self, message: pb.WorkerMessage) -> None:
        """Put ``message`` back: :meth:`next` returns it first."""
        self._unread.append(message)

    async def send(self, message: pb.CoordinatorMessage) -> None:
        await self.outbox.put(message)

    async def send_task(self, task: pb.Task, weights: Weights) -> str:
        """Send ``task`` with ``weights`` as its payload; returns its task id."""
        task.task_id = task.task_id or uuid.uuid4().hex
        task.weights.CopyFrom(make_header(weights, CHUNK))
        await self.send(pb.CoordinatorMessage(task=task))
        for i, data in enumerate(iter_chunks(weights, CHUNK)):
            await self.send(pb.CoordinatorMessage(chunk=pb.PayloadChunk(index=i, data=data)))
        return task.task_id

    async def next(self, timeout: float = TIMEOUT) -> pb.WorkerMessage:
        """The next message other than a heartbeat."""
        if self._unread:
            return self._unread.pop()
        while True:
            message = await asyncio.wait_for(self.inbox.get(), timeout)
            if message is None:
                raise AssertionError("the worker closed its stream")
            if message.WhichOneof("body") != "heartbeat":
                return message

    async def next_secagg(self, kind: str) -> Any:
        """The worker's next secure-aggregation message, which must be of ``kind``."""
        message = await self.next()
        assert message.WhichOneof("body") == "secagg", message
        body = message.secagg
        assert body.WhichOneof("body") == kind, body
        return getattr(body, kind)

    async def outcome(self, task_id: str) -> tuple[pb.TaskResult | pb.TaskError, Weights]:
        """The task's result (with its update) or error; secure-aggregation messages that
        arrive meanwhile are kept in :attr:`secagg_seen`."""
        while True:
            message = await self.next()
            kind = message.WhichOneof("body")
            if kind == "secagg":
                self.secagg_seen.append(message.secagg)
                continue
            if kind == "error":
                assert message.error.task_id == task_id, message
                return message.error, {}
            assert kind == "result", message
            result = message.result
            assert result.task_id == task_id
            if not result.HasField("update"):
                return result, {}
            assembler = PayloadAssembler(result.update, max_bytes=1 << 30, max_chunk_bytes=CHUNK)
            while not assembler.complete:
                chunk = await self.next()
                assembler.add(chunk.chunk)
            return result, assembler.weights()

    async def refusal(self, task_id: str) -> str:
        """The worker's refusal of ``task_id`` (fails on anything else); a plan awaiting its
        owner's approval is refused with its own code."""
        outcome, _ = await self.outcome(task_id)
        assert isinstance(outcome, pb.TaskError), f"expected a refusal, got {outcome}"
        assert outcome.code in (pb.ERROR_CODE_REFUSED, pb.ERROR_CODE_AWAITING_APPROVAL), outcome
        return outcome.message


class ScriptedCoordinator(pb_grpc.CoordinatorServicer):
    """Welcomes every worker and hands its :class:`Session` to the test."""

    def __init__(self) -> None:
        self.sessions: dict[str, asyncio.Future[Session]] = {}

    def session_of(self, name: str) -> asyncio.Future[Session]:
        return self.sessions.setdefault(name, asyncio.get_running_loop().create_future())

    async def Join(
        self, request_iterator: AsyncIterator[pb.WorkerMessage], context: Any
    ) -> AsyncIterator[pb.CoordinatorMessage]:
        first = await anext(aiter(request_iterator))
        hello = first.hello
        session = Session(hello)
        yield pb.CoordinatorMessage(
            welcome=pb.Welcome(
                worker_id=uuid.uuid4().hex,
                protocol_version=PROTOCOL_VERSION,
                heartbeat_interval_s=5.0,
                chunk_bytes=CHUNK,
            )
        )
        future = self.session_of(hello.name)
        if future.done():  # a reconnect: the test sees the new stream
            self.sessions[hello.name] = future = asyncio.get_running_loop().create_future()
        future.set_result(session)

        async def pump() -> None:
            async for message in request_iterator:
                await session.inbox.put(message)
            await session.inbox.put(None)

        reader = asyncio.create_task(pump())
        try:
            while True:
                out = await session.outbox.get()
                if out is None:
                    return
                yield out
        finally:
            reader.cancel()


@contextlib.asynccontextmanager
async def hostile_coordinator() -> AsyncIterator[tuple[ScriptedCoordinator, int]]:
    """A scripted coordinator on 127.0.0.1 (port chosen by the OS)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ]
    )
    coordinator = ScriptedCoordinator()
    pb_grpc.add_CoordinatorServicer_to_server(coordinator, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield coordinator, port
    finally:
        for future in coordinator.sessions.values():
            if future.done():
                await future.result().outbox.put(None)  # end each stream cleanly
        await server.stop(1.0)


def fit_task(
    model: str = "logreg",
    params: dict[str, Any] | None = None,
    *,
    round: int = 1,
    secagg: RoundSetup | None = None,
    **train: Any,
) -> pb.Task:
    """A fit task; ``train`` overrides TrainConfig fields (``extra`` too)."""
    config: dict[str, Any] = dict(epochs=1, batch_size=64, optimizer="sgd", learning_rate=0.1)
    config.update(train)
    return pb.Task(
        round=round,
        kind=pb.TASK_KIND_FIT,
        model=pb.ModelSpec(name=model, params_json=json.dumps(params or {})),
        train=pb.TrainConfig(**config),
        secagg=wire.setup_to_proto(secagg) if secagg is not None else None,
    )


def evaluate_task(weights_model: str = "logreg", *, round: int = 1) -> pb.Task:
    return pb.Task(round=round, kind=pb.TASK_KIND_EVALUATE, model=pb.ModelSpec(name=weights_model))


class FakePeers:
    """Honest-looking peers 2..n of a secure round whose worker 1 is the real process.

    ``identities``: in a signed round, the signing identities the peers use, by silo name
    (the real silos' keys for an honest control; keys the coordinator made up for an attack).
    """

    def __init__(
        self,
        setup: RoundSetup,
        n: int,
        words: int,
        identities: dict[str, SiloIdentity] | None = None,
    ) -> None:
        self.setup = setup
        self.rid = setup.round_id
        rules = ClientRules(min_group_size=2, min_threshold=0.01)  # the attacker's own
        ids = identities or {}
        self.clients = {
            u: SecAggClient(
                setup,
                rules=rules,
                identity=ids.get(setup.members[u - 1]) if setup.signed else None,
            )
            for u in range(2, n + 1)
        }
        self.server = SecAggServer(setup, n, words)
        self.words = words
        self.inboxes: dict[int, Any] = {}

    def mask_peers(self) -> None:
        """Phase 3 for the fake peers (zero inputs), so they can take part in phase 4."""
        for u, client in self.clients.items():
            client.receive_shares(self.inboxes[u])
            client.mask_vector(np.zeros(self.words, self.setup.fixed_point.dtype))

    async def run_to_masked_input(self, session: Session, task_id: str) -> Any:
        """Phases 1-2 with the worker; returns its masked TaskResult (or its error)."""
        keys = await session.next_secagg("keys")
        self.server.add_keys(1, wire.keys_from_proto(keys))
        for u, c in self.clients.items():
            self.server.add_keys(u, c.advertise())
        directories = self.server.close_keys()
        peers = wire.directory_to_proto(self.rid, directories[1])
        await session.send(pb.CoordinatorMessage(secagg=pb.SecAggCoordinatorMessage(peers=peers)))
        message = await session.next()
        if message.WhichOneof("body") != "secagg" or message.secagg.WhichOneof("body") != "shares":
            session.unread(message)  # the worker refused the directory
            return await session.outcome(task_id)
        self.server.add_shares(1, wire.shares_from_proto(message.secagg.shares))
        for u, c in self.clients.items():
            self.server.add_shares(u, c.share_keys(directories[u]))
        inboxes = self.server.close_shares()
        self.inboxes = inboxes
        shares = wire.shares_to_proto(self.rid, inboxes[1])
        await session.send(pb.CoordinatorMessage(secagg=pb.SecAggCoordinatorMessage(shares=shares)))
        return await session.outcome(task_id)

    async def unmask(self, session: Session, survivors: set[int], dropped: set[int]) -> Any:
        request = pb.SecAggUnmaskRequest(
            round_id=self.rid, survivors=sorted(survivors), dropped=sorted(dropped)
        )
        await session.send(
            pb.CoordinatorMessage(secagg=pb.SecAggCoordinatorMessage(unmask=request))
        )
        message = await session.next()
        assert message.WhichOneof("body") == "secagg", message
        return message.secagg


async def signed_unmask(
    peers: FakePeers,
    session: Session,
    survivors: set[int],
    *,
    peers_shown: set[int] | None = None,
) -> tuple[Any, Any]:
    """A signed round's phase 4: the worker (index 1) is shown ``survivors``; the fake peers
    (honest clients) are shown ``peers_shown`` (default: the same). Returns the worker's answer
    to the request (its consistency signature, or an abort), then its answer to the relayed
    signatures (its shares, or an abort); ``None`` for the second if it never got that far."""
    n = len(peers.setup.members)
    mine = UnmaskRequest(frozenset(survivors), frozenset(range(1, n + 1)) - survivors)
    theirs = peers_shown if peers_shown is not None else survivors
    others = UnmaskRequest(frozenset(theirs), frozenset(range(1, n + 1)) - theirs)
    request = wire.request_to_proto(peers.rid, mine)
    await session.send(pb.CoordinatorMessage(secagg=pb.SecAggCoordinatorMessage(unmask=request)))
    first = await session.next()
    assert first.WhichOneof("body") == "secagg", first
    if first.secagg.WhichOneof("body") != "consistency":
        return first.secagg, None
    signatures = [wire.consistency_from_proto(first.secagg.consistency)]
    peers.mask_peers()
    for u, client in peers.clients.items():
        if u in theirs:
            signatures.append(client.consistency(others))
    relay = wire.signatures_to_proto(peers.rid, signatures)
    await session.send(pb.CoordinatorMessage(secagg=pb.SecAggCoordinatorMessage(signatures=relay)))
    second = await session.next()
    assert second.WhichOneof("body") == "secagg", second
    return first.secagg, second.secagg


def crafted_eval_weights(klass: int) -> Weights:
    """logreg weights that predict class ``klass`` for every input: accuracy is its share."""
    weight = np.zeros((10, 784), np.float32)
    bias = np.zeros(10, np.float32)
    bias[klass] = 1.0
    return {"linear.weight": weight, "linear.bias": bias}
