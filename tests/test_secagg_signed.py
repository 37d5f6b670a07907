"""Signed secure aggregation in memory: identities and rosters, the round binding, the
consistency check, and fed-certs' files. Each attack has its honest control beside it."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest

from fedcore.certs_cli import main as fed_certs
from fedcore.errors import ConfigError, SecAggError, SecAggRefusedError
from fedcore.secagg import SecAggParams
from fedcore.secagg.client import ClientRules, ClientState, SecAggClient
from fedcore.secagg.identity import Roster, SiloIdentity
from fedcore.secagg.messages import RoundSetup, UnmaskRequest
from fedcore.secagg.quantize import COUNT_WORDS
from fedcore.secagg.server import SecAggServer
from fedcore.secagg.setup import make_setup
from fedcore.secagg.simulation import Simulation, make_identities

NAMES = ["a", "b", "c", "d", "e"]
D = 16


def _setup(names: list[str] = NAMES, **changes: object) -> RoundSetup:
    setup = make_setup(SecAggParams(), len(names), 50, members=names, job="j", round_number=3)
    return dataclasses.replace(setup, **changes)  # type: ignore[arg-type]


def _masked_round(
    setup: RoundSetup, ids: dict[str, SiloIdentity]
) -> tuple[dict[int, SecAggClient], SecAggServer]:
    """Phases 1-3 of a signed round of every member (zero inputs)."""
    clients = {
        i: SecAggClient(setup, identity=ids[name], rules=ClientRules())
        for i, name in enumerate(setup.members, 1)
    }
    n = len(clients)
    server = SecAggServer(setup, n, D + COUNT_WORDS, rng=random.Random(0))
    for i, c in clients.items():
        server.add_keys(i, c.advertise())
    directories = server.close_keys()
    for i, c in clients.items():
        server.add_shares(i, c.share_keys(directories[i]))
    inboxes = server.close_shares()
    for i, c in clients.items():
        c.receive_shares(inboxes[i])
        c.mask_vector(np.zeros(D + COUNT_WORDS, setup.fixed_point.dtype))
        server.add_masked(i, np.zeros(D + COUNT_WORDS, setup.fixed_point.dtype))
    return clients, server


def test_a_signed_round_sums_exactly_like_an_unsigned_one() -> None:
    deltas = [np.full(100, 0.01 * i, np.float32) for i in range(6)]
    for drop in ({}, {"keys": {0}}, {"shares": {3}}, {"input": {1}}, {"unmask": {2}}):
        sums = []
        for signed in (False, True):
            sim = Simulation(SecAggParams(), deltas, [10] * 6, drop=drop, signed=signed)
            result = sim.run()
            np.testing.assert_array_equal(
                result.ring_sum, sim.expected_ring_sum(result.contributors)
            )
            sums.append(result.weighted_sum)
        np.testing.assert_allclose(sums[0], sums[1], atol=1e-3)


def test_keys_made_up_by_the_coordinator_are_refused_before_any_share() -> None:
    setup = _setup()
    ids = make_identities(NAMES)
    forged = make_identities(NAMES)  # same names, keys the coordinator holds
    victim = SecAggClient(setup, identity=ids["a"])
    server = SecAggServer(setup, 5, D + COUNT_WORDS)
    server.add_keys(1, victim.advertise())
    for i, name in enumerate(NAMES[1:], 2):
        server.add_keys(i, SecAggClient(setup, identity=forged[name]).advertise())
    directory = server.close_keys()[1]
    with pytest.raises(SecAggRefusedError, match="not signed by an enrolled silo"):
        victim.share_keys(directory)
    assert victim.state is ClientState.ABORTED
    # Control: the same directory with the real silos' keys is accepted.
    honest, _ = _masked_round(setup, ids)
    assert honest[1].state is ClientState.MASKED


def test_a_peer_shown_another_round_fails_verification() -> None:
    """The coordinator tells the victim t=3 and its peers t=4 (or another member order):
    their signatures are bound to their view and do not verify against the victim's."""
    ids = make_identities(NAMES)
    for change in ({"threshold": 4}, {"members": ("a", "c", "b", "d", "e")}, {"round_number": 4}):
        mine = _setup()
        theirs = dataclasses.replace(mine, **change)
        victim = SecAggClient(mine, identity=ids["a"])
        server = SecAggServer(mine, 5, D + COUNT_WORDS)
        server.add_keys(1, victim.advertise())
        for i in range(2, 6):
            name = theirs.members[i - 1]
            server.add_keys(i, SecAggClient(theirs, identity=ids[name]).advertise())
        with pytest.raises(SecAggRefusedError, match="not signed"):
            victim.share_keys(server.close_keys()[1])


def test_members_outside_the_roster_or_a_missing_setup_are_refused() -> None:
    ids = make_identities(NAMES)
    with pytest.raises(SecAggRefusedError, match=r"not in this worker's roster"):
        SecAggClient(_setup([*NAMES, "sybil"]), identity=ids["a"]).advertise()
    unsigned = make_setup(SecAggParams(), 5, 50)
    with pytest.raises(SecAggRefusedError, match="requires signed secure aggregation"):
        SecAggClient(unsigned, identity=ids["a"]).advertise()
    with pytest.raises(SecAggRefusedError, match="does not name this worker"):
        SecAggClient(_setup(["b", "c", "d"]), identity=ids["a"]).advertise()
    with pytest.raises(SecAggRefusedError, match="names a silo twice"):
        SecAggClient(_setup(["a", "b", "b"]), identity=ids["a"]).advertise()
    # Control: the enrolled members.
    assert SecAggClient(_setup(), identity=ids["a"]).advertise().signature


def test_two_survivor_sets_abort_with_nothing_revealed() -> None:
    setup = _setup()
    ids = make_identities(NAMES)
    everyone = frozenset(range(1, 6))
    shown_a = UnmaskRequest(everyone, frozenset())
    # The others are told worker 1 dropped: they would reveal its masking key.
    shown_rest = UnmaskRequest(everyone - {1}, frozenset({1}))
    clients, _ = _masked_round(setup, ids)
    sigs = [clients[1].consistency(shown_a)] + [
        clients[i].consistency(shown_rest) for i in range(2, 6)
    ]
    with pytest.raises(SecAggRefusedError, match="different survivor sets"):
        clients[1].unmask_checked(sigs)
    assert clients[1].state is ClientState.ABORTED
    # Withholding the others' signatures does not help: fewer than t agree.
    clients, _ = _masked_round(setup, ids)
    own = clients[1].consistency(shown_a)
    with pytest.raises(SecAggRefusedError, match=r"only 1 of this worker's group signed"):
        clients[1].unmask_checked([own])
    # Control: everyone shown the same set reveals.
    clients, _ = _masked_round(setup, ids)
    sigs = [c.consistency(shown_a) for c in clients.values()]
    response = clients[1].unmask_checked(sigs)
    assert set(response.self_mask_shares) == set(everyone)


def test_signed_clients_refuse_shares_without_the_check() -> None:
    setup = _setup()
    clients, _ = _masked_round(setup, make_identities(NAMES))
    with pytest.raises(SecAggRefusedError, match="without the consistency check"):
        clients[1].unmask(UnmaskRequest(frozenset(range(1, 6)), frozenset()))


def test_roster_and_identity_files(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    assert fed_certs(["init", "--dir", str(certs), "--workers", "h-a,h-b"]) == 0
    roster = Roster.load(certs / "roster.json")
    assert set(roster.fingerprints) == {"h-a", "h-b"}
    key = certs / "workers" / "h-a.signing.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    identity = SiloIdentity.load("h-a", key, certs / "roster.json")
    with pytest.raises(ConfigError, match="does not match the roster"):
        SiloIdentity.load("h-b", key, certs / "roster.json")
    # Revoking a worker removes it from the roster its peers check.
    assert fed_certs(["revoke", "--dir", str(certs), "h-b"]) == 0
    assert set(Roster.load(certs / "roster.json").fingerprints) == {"h-a"}
    identity = SiloIdentity.load("h-a", key, certs / "roster.json")
    with pytest.raises(SecAggError, match="not in this worker's roster"):
        identity.verify("h-b", identity.public, b"m", identity.sign(b"m"))
    # A roster listing one key for two names would let one silo count twice.
    doubled = json.loads((certs / "roster.json").read_text())
    doubled["silos"]["h-c"] = doubled["silos"]["h-a"]
    (tmp_path / "bad.json").write_text(json.dumps(doubled))
    with pytest.raises(ConfigError, match="share a signing key"):
        Roster.load(tmp_path / "bad.json")
