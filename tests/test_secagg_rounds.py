"""Whole secure-aggregation rounds in memory: exactness bit for bit, dropouts at every
phase, aborts below the threshold, privacy sanity checks, and the refusals of an honest
worker."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from fedcore.errors import SecAggAbortedError, SecAggError, SecAggRefusedError
from fedcore.secagg import ClientState, SecAggClient, SecAggParams, ServerState
from fedcore.secagg.messages import EncryptedShare, UnmaskRequest
from fedcore.secagg.setup import make_setup
from fedcore.secagg.simulation import PHASES, Simulation, exchange_shares

D = 2_000


def _inputs(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    rng = np.random.default_rng(seed)
    deltas = [rng.normal(0, 0.2, D).astype(np.float32) for _ in range(n)]
    counts = [int(c) for c in rng.integers(1, 5_000, n)]
    return deltas, counts


def _check_exact(sim: Simulation, expected_contributors: set[int]) -> None:
    result = sim.run()
    assert set(result.contributors) == expected_contributors
    # Bit for bit: the unmasked ring sum equals the sum of the plain quantized vectors.
    np.testing.assert_array_equal(result.ring_sum, sim.expected_ring_sum(result.contributors))
    # And it decodes to the example-weighted mean of the contributors' deltas.
    idx = sorted(u - 1 for u in expected_contributors)
    counts = np.array([sim.counts[i] for i in idx], dtype=np.float64)
    truth = sum(sim.deltas[i].astype(np.float64) * c for i, c in zip(idx, counts, strict=True))
    truth /= counts.sum()
    assert result.num_examples == counts.sum()
    step = sim.params.clip / (2 ** (sim.params.bits - 1) - 1)
    assert np.abs(result.mean - truth).max() < 8 * step * len(sim.deltas) ** 0.5


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_aggregate_is_exact_without_dropouts(n: int) -> None:
    deltas, counts = _inputs(n, seed=n)
    _check_exact(Simulation(SecAggParams(), deltas, counts, seed=n), set(range(1, n + 1)))


@pytest.mark.parametrize(("n", "phase"), list(itertools.product([3, 5, 10], PHASES)))
def test_aggregate_is_exact_with_dropouts_at_every_phase(n: int, phase: str) -> None:
    params = SecAggParams()
    t = params.threshold_for(n)
    dropped = set(range(n - t))  # as many as the threshold allows
    deltas, counts = _inputs(n, seed=n)
    sim = Simulation(params, deltas, counts, drop={phase: dropped}, seed=n)
    # Workers lost at the unmasking phase already sent their input: it still counts.
    contributors = set(range(1, n + 1))
    if phase != "unmask":
        contributors -= {i + 1 for i in dropped}
    _check_exact(sim, contributors)


def test_dropouts_spread_over_all_phases_with_secagg_plus() -> None:
    n = 16
    params = SecAggParams(neighbours=8, threshold=0.5)  # groups of 9, t = 5
    deltas, counts = _inputs(n, seed=7)
    drop = {"keys": {0}, "shares": {5}, "input": {9}, "unmask": {12}}
    sim = Simulation(params, deltas, counts, drop=drop, seed=3)
    _check_exact(sim, set(range(1, n + 1)) - {1, 6, 10})


@pytest.mark.parametrize("phase", PHASES)
def test_below_threshold_the_round_aborts_and_reveals_nothing(phase: str) -> None:
    n = 5
    params = SecAggParams()  # t = 3
    deltas, counts = _inputs(n)
    sim = Simulation(params, deltas, counts, drop={phase: {0, 1, 2}})
    with pytest.raises(SecAggAbortedError, match="below the threshold"):
        sim.run()


def test_abort_before_unmasking_sends_no_request() -> None:
    n = 4
    params = SecAggParams(threshold=3)
    sim = Simulation(params, *_inputs(n), drop={"input": {0, 1}})
    with pytest.raises(SecAggAbortedError, match="masked input: 2 worker"):
        sim.run()


# ---------------------------------------------------------------------------- privacy sanity


def _chi_square_uniform(words: np.ndarray, shift: int) -> float:
    counts = np.bincount(
        ((words >> np.uint32(shift)) & np.uint32(0xFF)).astype(np.int64), minlength=256
    )
    expected = words.size / 256
    return float(((counts - expected) ** 2 / expected).sum())


# 255 degrees of freedom: P(chi2 > 360) < 1e-5, so an honest mask fails once in 100,000 runs.
CHI2_LIMIT = 360.0


def test_a_masked_input_is_indistinguishable_from_uniform() -> None:
    n, d = 3, 1 << 16
    deltas = [np.full(d, 0.25, np.float32) for _ in range(n)]  # maximally structured input
    sim = Simulation(SecAggParams(), deltas, [10] * n)
    setup = make_setup(sim.params, n, 30)
    sim.run()
    masked = _masked_vectors(sim)
    assert setup.fixed_point.ring_bits == 32
    plain = sim.plain[1][:d]
    assert _chi_square_uniform(plain, 0) > 10 * CHI2_LIMIT  # the input alone is far from uniform
    for vector in masked.values():
        for shift in (0, 8, 16, 24):
            assert _chi_square_uniform(vector[:d], shift) < CHI2_LIMIT


def _masked_vectors(sim: Simulation) -> dict[int, np.ndarray]:
    """Re-run the masking of a finished simulation's plain vectors through fresh clients."""
    n = len(sim.deltas)
    setup = make_setup(sim.params, n, sum(sim.counts))
    clients = {u: SecAggClient(setup) for u in range(1, n + 1)}
    from fedcore.secagg.server import SecAggServer

    server = SecAggServer(setup, n, sim.deltas[0].size + 2)
    for u, c in clients.items():
        server.add_keys(u, c.advertise())
    directories = server.close_keys()
    for u, c in clients.items():
        server.add_shares(u, c.share_keys(directories[u]))
    inboxes = server.close_shares()
    out = {}
    for u, c in clients.items():
        c.receive_shares(inboxes[u])
        vector = sim.plain[u].copy()
        c.mask_vector(vector)
        out[u] = vector
    return out


def test_no_strict_subset_of_masked_inputs_reveals_its_sum() -> None:
    n, d = 4, 1 << 15
    deltas, counts = _inputs(n)
    deltas = [np.resize(x, d) for x in deltas]
    sim = Simulation(SecAggParams(), deltas, counts)
    sim.run()
    masked = _masked_vectors(sim)
    everyone = sorted(masked)
    for size in range(1, n):
        for subset in itertools.combinations(everyone, size):
            total = sum((masked[u].astype(np.uint64) for u in subset), np.zeros(d + 2, np.uint64))
            plain = sum(
                (sim.plain[u].astype(np.uint64) for u in subset), np.zeros(d + 2, np.uint64)
            )
            residue = ((total - plain) & np.uint64(0xFFFFFFFF)).astype(np.uint32)[:d]
            assert np.mean(residue == 0) < 1e-3
            assert _chi_square_uniform(residue, 24) < CHI2_LIMIT
    # The full set does reveal the sum (the masks cancel but for the self masks).
    full = sum((masked[u].astype(np.uint64) for u in everyone), np.zeros(d + 2, np.uint64))
    assert full.any()


# ---------------------------------------------------------------------------- honest worker


def _ready_clients(n: int = 4) -> tuple[dict[int, SecAggClient], object]:
    from fedcore.secagg.server import SecAggServer

    setup = make_setup(SecAggParams(), n, 100)
    clients = {u: SecAggClient(setup) for u in range(1, n + 1)}
    server = SecAggServer(setup, n, 10)
    exchange_shares(server, clients)
    for c in clients.values():
        c.mask(np.zeros(8), 5)
    return clients, server


def test_worker_refuses_to_reveal_both_shares_of_one_peer() -> None:
    clients, _ = _ready_clients()
    greedy = UnmaskRequest(survivors=frozenset({1, 2, 3, 4}), dropped=frozenset({4}))
    with pytest.raises(SecAggRefusedError, match=r"both shares of worker\(s\) \[4\]"):
        clients[1].unmask(greedy)
    assert clients[1].state is ClientState.ABORTED  # and its secrets are forgotten
    with pytest.raises(SecAggRefusedError):
        clients[1].unmask(UnmaskRequest(frozenset({1, 2, 3}), frozenset({4})))


def test_worker_answers_one_unmasking_request_only() -> None:
    """Asking for b-shares first and key-shares later is the same attack in two steps."""
    clients, _ = _ready_clients()
    first = clients[1].unmask(UnmaskRequest(frozenset({1, 2, 3, 4}), frozenset()))
    assert set(first.self_mask_shares) == {1, 2, 3, 4}
    assert not first.key_shares
    with pytest.raises(SecAggRefusedError, match="state done"):
        clients[1].unmask(UnmaskRequest(frozenset({1, 2, 3}), frozenset({4})))


@pytest.mark.parametrize(
    ("survivors", "dropped", "message"),
    [
        ({2, 3, 4}, {1}, "calls this worker dropped"),
        ({1, 2}, {3, 4}, "below the threshold"),
    ],
)
def test_worker_refuses_dishonest_requests(
    survivors: set[int], dropped: set[int], message: str
) -> None:
    clients, _ = _ready_clients()
    with pytest.raises(SecAggRefusedError, match=message):
        clients[1].unmask(UnmaskRequest(frozenset(survivors), frozenset(dropped)))


def test_tampered_or_misrouted_share_aborts_the_worker() -> None:
    from fedcore.secagg.server import SecAggServer

    setup = make_setup(SecAggParams(), 3, 10)
    clients = {u: SecAggClient(setup) for u in (1, 2, 3)}
    server = SecAggServer(setup, 3, 10)
    for u, c in clients.items():
        server.add_keys(u, c.advertise())
    directories = server.close_keys()
    for u, c in clients.items():
        server.add_shares(u, c.share_keys(directories[u]))
    inboxes = server.close_shares()
    share = inboxes[1][0]
    bad = replace(share, ciphertext=share.ciphertext[:-1] + bytes([share.ciphertext[-1] ^ 1]))
    with pytest.raises(SecAggError, match="failed authentication"):
        clients[1].receive_shares([bad, *inboxes[1][1:]])
    assert clients[1].state is ClientState.ABORTED
    # A share meant for worker 3 handed to worker 2 does not open either (the AAD names 3).
    for_3 = next(s for s in inboxes[3] if s.sender == 1)
    with pytest.raises(SecAggError, match="failed authentication"):
        clients[2].receive_shares([EncryptedShare(1, 2, for_3.ciphertext), *inboxes[2][1:]])


def test_server_refuses_out_of_order_and_foreign_messages() -> None:
    clients, server = _ready_clients()
    assert server.state is ServerState.INPUTS  # type: ignore[attr-defined]
    with pytest.raises(SecAggError, match="cannot accept keys"):
        server.add_keys(1, clients[1].advertise())  # type: ignore[attr-defined]
    with pytest.raises(SecAggError, match="expected uint32"):
        server.add_masked(1, np.zeros(3, np.uint32))  # type: ignore[attr-defined]
