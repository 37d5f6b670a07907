"""Signed secure aggregation against an active coordinator: a real ``fed-worker`` started
with ``--signing-key --roster`` (the files ``fed-certs`` writes), driven by the scripted
hostile coordinator of tests/hostile.py whose other group members are in-memory clients.

The positive control (a signed round with the real silos' keys, the same survivor set shown
to everyone) completes and the worker reveals its shares; then each attack on the same
stream is refused with its reason and nothing is revealed: keys the coordinator made up, a
round padded with unenrolled names, two views of the survivor set, relayed signatures
withheld, and the unmasking request sent without the consistency check."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from conftest import Proc, start_worker
from hostile import FakePeers, Session, fit_task, hostile_coordinator, signed_unmask

from fedcore.certs_cli import main as fed_certs
from fedcore.models import build_model, get_weights
from fedcore.plan import ModelSpec
from fedcore.secagg import SecAggParams, wire
from fedcore.secagg.identity import SiloIdentity
from fedcore.secagg.messages import RoundSetup, UnmaskRequest
from fedcore.secagg.quantize import COUNT_WORDS
from fedcore.secagg.setup import make_setup
from fedcore.secagg.simulation import make_identities
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights

pytestmark = pytest.mark.slow

WORDS = 7850 + COUNT_WORDS
SILOS = ["victim", "silo-2", "silo-3"]


def _logreg(offset: float) -> Weights:
    return {
        k: v + np.float32(offset)
        for k, v in get_weights(build_model(ModelSpec("logreg"), seed=0)).items()
    }


def _setup(members: list[str], round_number: int) -> RoundSetup:
    return make_setup(
        SecAggParams(clip=4.0, signed=True),
        len(members),
        400,
        members=members,
        job="hostile",
        round_number=round_number,
    )


async def _abort_reasons(session: Session) -> list[str]:
    return [m.abort.reason for m in session.secagg_seen if m.WhichOneof("body") == "abort"]


async def test_signed_worker_refuses_an_active_coordinator(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    # The data owners' files, as fed-certs writes them.
    certs = tmp_path / "certs"
    assert fed_certs(["init", "--dir", str(certs), "--workers", ",".join(SILOS)]) == 0
    roster = certs / "roster.json"
    real = {
        name: SiloIdentity.load(name, certs / "workers" / f"{name}.signing.pem", roster)
        for name in SILOS
    }

    async with hostile_coordinator() as (coordinator, port):
        worker: Proc = start_worker(
            procs,
            port,
            shards / "shard-0.npz",
            "victim",
            "--give-up-after",
            "60",
            "--signing-key",
            str(certs / "workers" / "victim.signing.pem"),
            "--roster",
            str(roster),
        )
        s = await asyncio.wait_for(coordinator.session_of("victim"), 90)

        # Positive control: the real silos' signed keys, one survivor set for all: the
        # worker signs the request, checks the others' signatures and reveals its shares.
        setup = _setup(SILOS, 1)
        peers = FakePeers(setup, 3, WORDS, identities=real)
        masked, _ = await peers.run_to_masked_input(
            s, await s.send_task(fit_task(secagg=setup), _logreg(0.0))
        )
        assert isinstance(masked, pb.TaskResult), masked
        assert masked.update_kind == pb.UPDATE_KIND_MASKED
        first, second = await signed_unmask(peers, s, {1, 2, 3})
        assert first.WhichOneof("body") == "consistency", first
        assert second is not None
        assert second.WhichOneof("body") == "unmask", second
        assert len(second.unmask.self_mask_shares) == 3

        # 1. A group of keys the coordinator made up (for the enrolled names): refused before
        #    any share or mask is derived from them.
        setup = _setup(SILOS, 2)
        forged = make_identities(SILOS)  # the coordinator's own keys
        peers = FakePeers(setup, 3, WORDS, identities=forged)
        s.secagg_seen.clear()
        outcome, _ = await peers.run_to_masked_input(
            s, await s.send_task(fit_task(secagg=setup), _logreg(0.1))
        )
        assert isinstance(outcome, pb.TaskError)
        assert outcome.code == pb.ERROR_CODE_REFUSED
        reasons = await _abort_reasons(s)
        assert any("not signed by an enrolled silo" in r for r in reasons), reasons
        assert not any(m.WhichOneof("body") == "shares" for m in s.secagg_seen)

        # ... nor unsigned keys (the unsigned protocol's directory).
        setup = _setup(SILOS, 3)
        unsigned = FakePeers(setup, 3, WORDS, identities={})
        s.secagg_seen.clear()
        outcome, _ = await unsigned.run_to_masked_input(
            s, await s.send_task(fit_task(secagg=setup), _logreg(0.2))
        )
        assert isinstance(outcome, pb.TaskError)
        assert any("not signed by an enrolled silo" in r for r in await _abort_reasons(s))

        # 2. A round padded with a name the roster does not list (a sybil): no keys at all.
        setup = _setup([*SILOS, "sybil"], 4)
        s.secagg_seen.clear()
        task_id = await s.send_task(fit_task(secagg=setup), _logreg(0.3))
        outcome, _ = await s.outcome(task_id)
        assert isinstance(outcome, pb.TaskError)
        assert outcome.code == pb.ERROR_CODE_REFUSED
        reasons = await _abort_reasons(s)
        assert any("not in this worker's roster" in r and "sybil" in r for r in reasons), reasons
        assert not any(m.WhichOneof("body") == "keys" for m in s.secagg_seen)

        # 3. Two survivor sets: the worker is told all three survived, its peers that it
        #    dropped (they would reveal its masking key, it its self mask). Its peers'
        #    signatures are on the other set: it aborts, nothing revealed.
        setup = _setup(SILOS, 5)
        peers = FakePeers(setup, 3, WORDS, identities=real)
        masked, _ = await peers.run_to_masked_input(
            s, await s.send_task(fit_task(secagg=setup), _logreg(0.4))
        )
        assert isinstance(masked, pb.TaskResult), masked
        first, second = await signed_unmask(peers, s, {1, 2, 3}, peers_shown={2, 3})
        assert first.WhichOneof("body") == "consistency"
        assert second is not None
        assert second.WhichOneof("body") == "abort", second
        assert "did not sign the unmasking request this worker was shown" in second.abort.reason

        # 4. The coordinator withholds the others' signatures: below t, nothing revealed.
        setup = _setup(SILOS, 6)
        peers = FakePeers(setup, 3, WORDS, identities=real)
        masked, _ = await peers.run_to_masked_input(
            s, await s.send_task(fit_task(secagg=setup), _logreg(0.5))
        )
        assert isinstance(masked, pb.TaskResult), masked
        first, second = await signed_unmask(peers, s, {1, 2, 3}, peers_shown=set())
        assert second is not None
        assert second.WhichOneof("body") == "abort", second
        assert "only 1 of this worker's group signed" in second.abort.reason

        # 5. No request to sign: the others' signatures arrive straight after the masked
        #    input, asking for shares the worker never agreed to reveal.
        setup = _setup(SILOS, 7)
        peers = FakePeers(setup, 3, WORDS, identities=real)
        masked, _ = await peers.run_to_masked_input(
            s, await s.send_task(fit_task(secagg=setup), _logreg(0.6))
        )
        assert isinstance(masked, pb.TaskResult), masked
        request = UnmaskRequest(frozenset({1, 2, 3}), frozenset())
        peers.mask_peers()
        relay = wire.signatures_to_proto(
            setup.round_id, [c.consistency(request) for c in peers.clients.values()]
        )
        await s.send(pb.CoordinatorMessage(secagg=pb.SecAggCoordinatorMessage(signatures=relay)))
        answer = await s.next()
        assert answer.secagg.WhichOneof("body") == "abort", answer
        assert "cannot answer an unmasking request in state masked" in answer.secagg.abort.reason

        # 6. The same signed round again (job "hostile", round 5), over a moved model: the
        #    worker's participation record (beside its signing key) refuses it.
        setup = _setup(SILOS, 5)
        s.secagg_seen.clear()
        outcome, _ = await FakePeers(setup, 3, WORDS, identities=real).run_to_masked_input(
            s, await s.send_task(fit_task(secagg=setup), _logreg(0.8))
        )
        assert isinstance(outcome, pb.TaskError), outcome
        assert "already contributed to round 5 of job 'hostile'" in outcome.message

        await s.send(pb.CoordinatorMessage(shutdown=pb.Shutdown(reason="test over")))
        assert await asyncio.to_thread(worker.wait, 60) == 0, worker.output
    assert "Traceback" not in worker.output
