"""The whole protocol in one process: every worker's client and the coordinator's server
exchange messages directly. Used by the tests (exactness, dropouts at every phase) and by the
benchmark for numbers of workers too large for real processes."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .client import ClientRules, SecAggClient
from .identity import Roster, SiloIdentity, fingerprint, generate_signing_key, raw_public
from .params import SecAggParams
from .server import AggregateResult, SecAggServer
from .setup import make_setup
from .shamir import SHARE_BYTES

__all__ = ["PHASES", "Simulation", "exchange_shares", "make_identities"]

# Simulations explore any group and threshold (the protocol's maths); real workers enforce
# the safe defaults of ClientRules.
_SIMULATION_RULES = ClientRules(min_group_size=2, min_threshold=0.01)

#: Where a worker can drop: before sending keys, shares, its masked input or unmask shares.
PHASES = ("keys", "shares", "input", "unmask")


def make_identities(names: Sequence[str]) -> dict[str, SiloIdentity]:
    """Fresh signing keys for ``names`` and one roster that lists them all (tests, benchmark)."""
    keys = {name: generate_signing_key() for name in names}
    roster = Roster({name: fingerprint(raw_public(key)) for name, key in keys.items()})
    return {name: SiloIdentity(name, key, roster) for name, key in keys.items()}


def exchange_shares(server: SecAggServer, clients: Mapping[int, SecAggClient]) -> None:
    """Phases 1 and 2 in memory, every client present: the keys, the directory, the shares and
    their relay. Each client is then ready to mask its input."""
    for u, c in clients.items():
        server.add_keys(u, c.advertise())
    directories = server.close_keys()
    for u, c in clients.items():
        server.add_shares(u, c.share_keys(directories[u]))
    inboxes = server.close_shares()
    for u, c in clients.items():
        c.receive_shares(inboxes[u])


@dataclass
class Simulation:
    """One in-memory round.

    Args:
        params: the secure-aggregation settings.
        deltas: one flat float vector per worker.
        counts: one example count per worker.
        drop: for each phase of :data:`PHASES`, the (0-based) workers that vanish just before it.
        seed: seeds the stochastic rounding and graph (the masks stay cryptographic).
        keep_plain: keep every worker's plain quantized vector (for exactness checks).
        signed: run the signed mode (signed keys and the consistency check).
    """

    params: SecAggParams
    deltas: Sequence[npt.NDArray[np.floating]]
    counts: Sequence[int]
    drop: Mapping[str, set[int]] = field(default_factory=dict)
    seed: int = 0
    keep_plain: bool = True
    signed: bool = False
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    worker_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    plain: dict[int, npt.NDArray[np.unsignedinteger]] = field(default_factory=dict)

    def run(self) -> AggregateResult:
        """Run the four phases; returns the aggregate or raises SecAggAbortedError."""
        n = len(self.deltas)
        names = [f"silo-{i}" for i in range(1, n + 1)] if self.signed else []
        identities = make_identities(names)
        setup = make_setup(self.params, n, sum(self.counts), members=names, job="simulation")
        clients = {
            i + 1: SecAggClient(
                setup,
                rules=_SIMULATION_RULES,
                identity=identities.get(f"silo-{i + 1}"),
                rounding_seed=(self.seed * 1000 + i).to_bytes(32, "big"),
            )
            for i in range(n)
        }
        d = self.deltas[0].size
        server = SecAggServer(
            setup,
            n,
            d + 2,
            degree=self.params.degree(n),
            rng=random.Random(self.seed),
        )
        alive = set(clients)

        def drop(phase: str) -> None:
            alive.difference_update(i + 1 for i in self.drop.get(phase, set()))

        clock = time.perf_counter
        drop("keys")
        for u in sorted(alive):
            t = clock()
            keys = clients[u].advertise()
            self.timings["worker_keys"] += clock() - t
            self.worker_bytes["keys"] += 64
            server.add_keys(u, keys)
        t = clock()
        directories = server.close_keys()
        self.timings["server_keys"] += clock() - t
        drop("shares")
        for u in sorted(alive & set(directories)):
            t = clock()
            shares = clients[u].share_keys(directories[u])
            self.timings["worker_shares"] += clock() - t
            self.worker_bytes["shares"] += sum(len(s.ciphertext) + 8 for s in shares)
            server.add_shares(u, shares)
        t = clock()
        inboxes = server.close_shares()
        self.timings["server_shares"] += clock() - t
        drop("input")
        for u in sorted(alive & set(inboxes)):
            t = clock()
            clients[u].receive_shares(inboxes[u])
            vector, _ = clients[u].quantize(self.deltas[u - 1], self.counts[u - 1])
            if self.keep_plain:
                self.plain[u] = vector.copy()
            self.timings["worker_quantize"] += clock() - t
            t = clock()
            clients[u].mask_vector(vector)
            self.timings["worker_mask"] += clock() - t
            self.worker_bytes["input"] += vector.nbytes
            t = clock()
            server.add_masked(u, vector)
            self.timings["server_sum"] += clock() - t
        request = server.close_inputs()
        drop("unmask")
        if self.signed:
            for u in sorted(alive & set(server.recipients_of_request())):
                t = clock()
                signature = clients[u].consistency(request)
                self.timings["worker_consistency"] += clock() - t
                self.worker_bytes["consistency"] += 32 + 64 + 4
                server.add_consistency(u, signature)
            signatures = server.close_consistency()
        for u in sorted(alive & set(server.recipients_of_shares_request())):
            t = clock()
            if self.signed:
                response = clients[u].unmask_checked(signatures)
            else:
                response = clients[u].unmask(request)
            self.timings["worker_unmask"] += clock() - t
            self.worker_bytes["unmask"] += (SHARE_BYTES + 4) * (
                len(response.self_mask_shares) + len(response.key_shares)
            )
            server.add_unmask(u, response)
        t = clock()
        result = server.finish()
        self.timings["server_unmask"] += clock() - t
        return result

    def expected_ring_sum(
        self, contributors: set[int] | frozenset[int]
    ) -> npt.NDArray[np.unsignedinteger]:
        """The plain (unmasked) quantized sum of ``contributors``' vectors."""
        vectors = [self.plain[u] for u in sorted(contributors)]
        total = vectors[0].copy()
        for v in vectors[1:]:
            np.add(total, v, out=total)
        return total
