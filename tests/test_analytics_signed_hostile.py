"""Signed analytics rounds against an active coordinator: a real ``fed-worker`` serving a
table, whose signing key and roster come from its *policy file* ([secure-aggregation]), driven
by the scripted hostile coordinator of tests/hostile.py; the query's other silos are
in-memory clients.

The positive control (a signed query round with the real silos' keys) is answered: the
worker signs the unmasking request and reveals its shares. Then, on the same stream: a group
of keys the coordinator made up is refused before any share or masked answer leaves (and
nothing is charged), an unsigned query is refused up front, and a replay of the answered
query is refused by the participation record."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Proc, start_worker
from hostile import Session, hostile_coordinator

from fedcore.analytics.encoding import masked_words, round_setup
from fedcore.certs_cli import main as fed_certs
from fedcore.secagg import SecAggClient, wire
from fedcore.secagg.client import ClientRules
from fedcore.secagg.identity import SiloIdentity
from fedcore.secagg.messages import RoundSetup
from fedcore.secagg.server import SecAggServer
from fedcore.secagg.simulation import make_identities
from fedcore.v1 import fedcore_pb2 as pb

pytestmark = pytest.mark.slow

SILOS = ["victim", "silo-2", "silo-3"]
WORDS = masked_words(1)  # count(): one sum


def _table(root: Path, certs: Path) -> Path:
    rows = np.random.default_rng(5).integers(20, 90, 40)
    (root / "silo.csv").write_text("age\n" + "\n".join(f"{a}" for a in rows) + "\n")
    (root / "silo.meta.toml").write_text(
        'name = "clinic"\n[[features]]\nname = "age"\ndtype = "float64"\n'
        "minimum = 0\nmaximum = 100\n"
    )
    policy = root / "policy.toml"
    policy.write_text(
        '[budget]\nstudy = "s"\nepsilon = 50.0\ndelta = 1e-5\nledger = "ledger.json"\n'
        "[analytics]\nmax-epsilon = 5.0\n"
        "[secure-aggregation]\n"
        f'signing-key = "{certs / "workers" / "victim.signing.pem"}"\n'
        f'roster = "{certs / "roster.json"}"\n'
    )
    return policy


def _body(message: pb.WorkerMessage) -> tuple[str, Any]:
    assert message.WhichOneof("body") == "analytics", message
    kind = message.analytics.WhichOneof("body")
    assert kind is not None
    return kind, getattr(message.analytics, kind)


async def _next(session: Session) -> tuple[str, Any]:
    return _body(await session.next())


async def _secagg_reply(session: Session, expected: str) -> Any:
    """The worker's next secure message, which must be of kind ``expected``."""
    kind, body = await _next(session)
    assert kind == "secagg", body
    assert body.WhichOneof("body") == expected, body
    return body


async def _send(session: Session, **fields: Any) -> None:
    message = pb.AnalyticsCoordinatorMessage(**fields)
    await session.send(pb.CoordinatorMessage(analytics=message))


async def _send_secagg(session: Session, **fields: Any) -> None:
    await _send(session, secagg=pb.SecAggCoordinatorMessage(**fields))


class _Query:
    """One query: the worker is silo 1, ``identities`` sign for silos 2 and 3."""

    def __init__(self, identities: dict[str, SiloIdentity], query_id: str = "") -> None:
        self.query_id = query_id or uuid.uuid4().hex
        self.setup: RoundSetup = round_setup(self.query_id, 3, 30.0, members=SILOS)
        rules = ClientRules(min_group_size=2, min_threshold=0.01)
        self.peers = {
            u: SecAggClient(self.setup, rules=rules, identity=identities[SILOS[u - 1]])
            for u in (2, 3)
        }
        self.server = SecAggServer(self.setup, 3, WORDS)

    def task(self, setup: RoundSetup | None = None) -> pb.QueryTask:
        return pb.QueryTask(
            query_id=self.query_id,
            query="count()",
            epsilon=1.0,
            delta=1e-6,
            silos=3,
            secagg=wire.setup_to_proto(setup or self.setup),
        )

    async def to_shares(self, s: Session, expected: str) -> Any:
        """Task, keys, peers; returns the worker's answer to the key directory."""
        await _send(s, task=self.task())
        kind, _ = await _next(s)
        assert kind == "accept"
        keys = await _secagg_reply(s, "keys")
        self.server.add_keys(1, wire.keys_from_proto(keys.keys))
        for u, c in self.peers.items():
            self.server.add_keys(u, c.advertise())
        self.directories = self.server.close_keys()
        directory = wire.directory_to_proto(self.query_id, self.directories[1])
        await _send_secagg(s, peers=directory)
        return await _secagg_reply(s, expected)

    async def answer(self, s: Session, shares: Any) -> Any:
        """The rest of an honest round; returns the worker's unmasking shares."""
        self.server.add_shares(1, wire.shares_from_proto(shares.shares))
        for u, c in self.peers.items():
            self.server.add_shares(u, c.share_keys(self.directories[u]))
        inboxes = self.server.close_shares()
        await _send_secagg(s, shares=wire.shares_to_proto(self.query_id, inboxes[1]))
        kind, masked = await _next(s)
        assert kind == "masked", masked
        self.server.add_masked(1, np.frombuffer(masked.masked, "<u8").astype(np.uint64))
        for u, c in self.peers.items():
            c.receive_shares(inboxes[u])
            vector = np.zeros(WORDS, np.uint64)
            c.mask_vector(vector)
            self.server.add_masked(u, vector)
        request = self.server.close_inputs()
        await _send_secagg(s, unmask=wire.request_to_proto(self.query_id, request))
        signed = await _secagg_reply(s, "consistency")
        signatures = [wire.consistency_from_proto(signed.consistency)]
        signatures += [c.consistency(request) for c in self.peers.values()]
        await _send_secagg(s, signatures=wire.signatures_to_proto(self.query_id, signatures))
        return await _secagg_reply(s, "unmask")


def _charges(ledger: Path) -> int:
    return len(json.loads(ledger.read_text())["studies"]["s"]["charges"])


async def test_a_signed_silo_refuses_made_up_keys_in_a_query_round(
    tmp_path: Path, procs: list[Proc]
) -> None:
    certs = tmp_path / "certs"
    assert fed_certs(["init", "--dir", str(certs), "--workers", ",".join(SILOS)]) == 0
    roster = certs / "roster.json"
    real = {
        name: SiloIdentity.load(name, certs / "workers" / f"{name}.signing.pem", roster)
        for name in SILOS
    }
    policy = _table(tmp_path, certs)
    async with hostile_coordinator() as (coordinator, port):
        worker = start_worker(procs, port, tmp_path / "silo.csv", "victim", "--policy", str(policy))
        s = await asyncio.wait_for(coordinator.session_of("victim"), 90)

        # Positive control: the real silos' signed keys; the query is answered.
        honest = _Query(real)
        shares = await honest.to_shares(s, "shares")
        last = await honest.answer(s, shares)
        assert len(last.unmask.self_mask_shares) == 3
        assert _charges(tmp_path / "ledger.json") == 1

        # 1. Keys the coordinator made up for the enrolled names: refused at the directory,
        #    before any share, masked answer or charge.
        forged = _Query(make_identities(SILOS))
        reply = await forged.to_shares(s, "abort")
        assert "not signed by an enrolled silo" in reply.abort.reason
        assert _charges(tmp_path / "ledger.json") == 1

        # 2. An unsigned query round: refused before any key leaves.
        unsigned = _Query(real)
        await _send(s, task=unsigned.task(round_setup(unsigned.query_id, 3, 30.0)))
        kind, refusal = await _next(s)
        assert kind == "refusal", refusal
        assert refusal.rule == "secure-aggregation.signed"

        # 3. The answered query again (same id, fresh keys): the participation record
        #    (beside the signing key) refuses a second masked answer.
        replay = _Query(real, honest.query_id)
        shares = await replay.to_shares(s, "shares")
        replay.server.add_shares(1, wire.shares_from_proto(shares.shares))
        for u, c in replay.peers.items():
            replay.server.add_shares(u, c.share_keys(replay.directories[u]))
        inboxes = replay.server.close_shares()
        await _send_secagg(s, shares=wire.shares_to_proto(replay.query_id, inboxes[1]))
        reply = await _secagg_reply(s, "abort")
        assert "already contributed to round 1 of job 'query " in reply.abort.reason
        assert _charges(tmp_path / "ledger.json") == 1

        await s.send(pb.CoordinatorMessage(shutdown=pb.Shutdown(reason="test over")))
        assert await asyncio.to_thread(worker.wait, 60) == 0, worker.output
    assert "Traceback" not in worker.output
