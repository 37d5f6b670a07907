"""Secure aggregation, coordinator side, against hostile workers: a malformed or lying
unmasking share does not abort (or skew) a round while more than t honest shares arrive, and a
masked example count that sums to 0 (or lies) neither crashes nor dominates the round.

Rounds are driven in memory (the real client and server state machines); each attack has its
honest control in the same test."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from test_coordinator import TIMEOUT, ScriptedTrainer, config, initial_weights, run_worker

from fedcore.errors import SecAggAbortedError, SecAggError
from fedcore.secagg import SecAggParams, shamir
from fedcore.secagg.client import SecAggClient
from fedcore.secagg.messages import UnmaskResponse
from fedcore.secagg.quantize import COUNT_WORDS, FixedPoint
from fedcore.secagg.server import AggregateResult, SecAggServer
from fedcore.secagg.setup import make_setup
from fedcore.server.engine.secagg_checks import bounded_count, bounded_mean, bounded_update
from fedcore.weights import Weights, signature_of

PARAMS = SecAggParams(clip=1.0, bits=16, phase_timeout=5.0)
D = 32
Tamper = Callable[[int, UnmaskResponse], UnmaskResponse]


def _round(
    n: int,
    *,
    drop_before_input: int | None = None,
    tamper: Tamper | None = None,
    count_lie: int | None = None,
) -> tuple[SecAggServer, AggregateResult, np.ndarray]:
    """One round of ``n`` workers; each sends delta ``0.01 * index`` over 10 examples.
    ``tamper`` rewrites one worker's unmasking response; ``count_lie`` makes worker 1 add that
    much to its masked count words. Returns the server, its result and the honest mean."""
    counts = [10] * n
    setup = make_setup(PARAMS, n, sum(counts))
    clients = {i: SecAggClient(setup) for i in range(1, n + 1)}
    server = SecAggServer(setup, n, D + COUNT_WORDS, rng=random.Random(0))
    for i, c in clients.items():
        server.add_keys(i, c.advertise())
    directories = server.close_keys()
    for i, c in clients.items():
        server.add_shares(i, c.share_keys(directories[i]))
    inboxes = server.close_shares()
    senders = [i for i in clients if i != drop_before_input]
    deltas = {i: np.full(D, 0.01 * i, dtype=np.float32) for i in senders}
    for i in senders:
        clients[i].receive_shares(inboxes[i])
        vector, _ = clients[i].quantize(deltas[i], counts[i - 1])
        if count_lie is not None and i == 1:
            vector[D] = (int(vector[D]) + count_lie) % (1 << setup.fixed_point.ring_bits)
        clients[i].mask_vector(vector)
        server.add_masked(i, vector)
    request = server.close_inputs()
    for i in server.recipients_of_request():
        response = clients[i].unmask(request)
        if tamper is not None:
            response = tamper(i, response)
        server.add_unmask(i, response)
    honest_mean = np.mean([deltas[i] for i in senders], axis=0)
    return server, server.finish(), honest_mean


def _flip(liar: int, field: str) -> Tamper:
    """Worker ``liar`` shifts every share of ``field`` by one (still a valid field element)."""

    def tamper(i: int, response: UnmaskResponse) -> UnmaskResponse:
        if i != liar:
            return response
        shares = getattr(response, field)
        bent = {
            owner: ((int.from_bytes(v, "big") + 1) % shamir.PRIME).to_bytes(
                shamir.SHARE_BYTES, "big"
            )
            for owner, v in shares.items()
        }
        return dataclasses.replace(response, **{field: bent})

    return tamper


def _truncate(liar: int) -> Tamper:
    def tamper(i: int, response: UnmaskResponse) -> UnmaskResponse:
        if i != liar:
            return response
        short = {owner: v[:10] for owner, v in response.self_mask_shares.items()}
        return dataclasses.replace(response, self_mask_shares=short)

    return tamper


def _mean(result: AggregateResult) -> np.ndarray:
    return result.weighted_sum * (result.weight_norm / result.num_examples)


def test_one_lying_or_malformed_unmasking_share_is_outvoted() -> None:
    # Stochastic rounding: a few quantization steps (3e-5 each) of the honest mean; a lie that
    # got through would leave a whole pseudo-random mask in the sum.
    atol = 1e-3
    # Control: 7 honest workers, one drops before its input (its masking key is rebuilt).
    server, honest, expected = _round(7, drop_before_input=7)
    np.testing.assert_allclose(_mean(honest), expected, atol=atol)
    assert server.suspects == {}
    # A shifted self-mask share, a shifted masking-key share, a truncated share: each from
    # one worker, with t=4 and 6 responders the other 5 outvote it; the sum stays exact.
    for tamper, what in (
        (_flip(3, "self_mask_shares"), "self mask"),
        (_flip(2, "key_shares"), "masking key"),
        (_truncate(5), "malformed"),
    ):
        server, result, expected = _round(7, drop_before_input=7, tamper=tamper)
        np.testing.assert_allclose(_mean(result), expected, atol=atol)
        assert result.num_examples == 60
        assert len(server.suspects) == 1
        assert what in next(iter(server.suspects.values()))


def test_with_only_t_honest_shares_a_bad_one_aborts_and_reveals_nothing_wrong() -> None:
    # 6 workers, t=4, one dropped: 5 responders, one lying -> 4 honest shares = t, not more.
    # Without a spare share the lie cannot be outvoted: the round aborts, never a wrong sum.
    with pytest.raises(SecAggAbortedError, match="inconsistent"):
        _round(6, drop_before_input=6, tamper=_flip(3, "self_mask_shares"))


def test_combine_robust_finds_the_liar_and_refuses_ambiguity() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, list(range(1, 8)), 3)
    assert shamir.combine_robust(shares, 3) == (secret, [])
    for liar in range(7):
        bent = list(shares)
        bent[liar] = shamir.Share(bent[liar].x, (bent[liar].y + 12345) % shamir.PRIME)
        assert shamir.combine_robust(bent, 3) == (secret, [liar + 1])
    # Two liars among 7 with t=3: 7 >= t + 2*2, still decoded.
    bent = list(shares)
    for liar in (0, 4):
        bent[liar] = shamir.Share(bent[liar].x, 7)
    assert shamir.combine_robust(bent, 3) == (secret, [1, 5])
    # t + 1 shares, one wrong: detected, not guessed.
    with pytest.raises(SecAggError, match="inconsistent"):
        shamir.combine_robust([*bent[:3], shares[3]], 3)


def test_a_masked_count_that_sums_to_zero_or_lies_neither_crashes_nor_skews(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "fedcore.server")
    n = 4
    # Control: the honest count is the announced 40 and is used as is.
    _, honest, expected = _round(n)
    assert bounded_count(1, honest.num_examples, [10] * n, honest.weight_norm) == 40
    assert "lied" not in caplog.text
    # Worker 1 subtracts the whole count: the masked counts sum to 0 (a division by zero).
    _, zero, expected = _round(n, count_lie=-40)
    assert zero.num_examples == 0
    count = bounded_count(1, zero.num_examples, [10] * n, zero.weight_norm)
    assert count == 40
    mean = bounded_mean(1, zero.weighted_sum, zero.weight_norm, count, clip=1.0, step=1e-4)
    np.testing.assert_allclose(mean, expected, atol=1e-3)
    # Or claims a million examples more: refused the same way, the mean is not diluted.
    _, inflated, _ = _round(n, count_lie=10**6)
    assert bounded_count(1, inflated.num_examples, [10] * n, inflated.weight_norm) == 40
    assert caplog.text.count("a worker lied about its count") == 2
    # An out-of-range input cannot move the model further than an honest worker could.
    huge = np.full(D, 50.0)
    clipped = bounded_mean(1, huge, 40.0, 40, clip=1.0, step=1e-4)
    assert np.abs(clipped).max() == 1.0
    assert "outside the clipping range" in caplog.text


@pytest.mark.parametrize("ring_bits", [32, 64])
def test_the_blockwise_update_equals_decoding_bounding_and_adding_whole_vectors(
    ring_bits: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The coordinator builds the round's update block by block: bit for bit what decoding
    the whole ring sum, bounding the mean and adding it to the global weights gives, across
    tensors and block boundaries, with out-of-range coordinates clipped and counted once."""
    caplog.set_level(logging.WARNING, "fedcore.server")
    fp = FixedPoint(16, 0.5, ring_bits)
    rng = np.random.default_rng(7)
    weights: Weights = {
        "a": rng.normal(0, 1, (300, 301)).astype(np.float32),
        "b": rng.normal(0, 1, 70_001).astype(np.float64),
    }
    d = sum(w.size for w in weights.values())
    values = rng.integers(-(fp.levels * 3), fp.levels * 3, d).astype(np.int64)
    values[:5] = fp.levels * 200  # far outside: a lying worker's input
    words = values.astype(fp.dtype)
    count, weight_norm = 30, 40.0
    mean = bounded_mean(1, fp.decode(words), weight_norm, count, clip=fp.clip, step=1.0 / fp.scale)
    whole, offset = {}, 0
    for name, g in weights.items():
        part = mean[offset : offset + g.size].reshape(g.shape)
        whole[name] = (g.astype(np.float64) + part).astype(g.dtype)
        offset += g.size
    caplog.clear()
    update = bounded_update(1, words, fp, weight_norm, count, weights, signature_of(weights))
    for name, w in whole.items():
        assert update[name].dtype == w.dtype
        assert update[name].shape == w.shape
        assert update[name].tobytes() == w.tobytes(), name
    raw = fp.decode(words) * (weight_norm / count)  # bounded_mean clipped ``mean`` in place
    outside = int(np.count_nonzero(np.abs(raw) > fp.clip * 1.01 + 1 / fp.scale))
    assert outside >= 5
    assert f"{outside} coordinate(s) of the unmasked mean lie outside" in caplog.text


async def test_a_secure_round_with_a_zero_count_completes_with_the_honest_mean(
    coordinator_factory: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the real protocol: one worker subtracts everyone's count from its masked count
    words, so the unmasked count is 0. The coordinator neither divides by zero nor drops the
    round: it weighs by the announced counts and the model moves by the honest mean."""
    caplog.set_level(logging.WARNING, "fedcore.server")
    params = SecAggParams(clip=4.0, bits=24, phase_timeout=10.0)
    honest_quantize = SecAggClient.quantize_onto
    lock, liars = threading.Lock(), list[SecAggClient]()

    def quantize_onto(self: SecAggClient, vector: Any, delta: Any, num_examples: int) -> int:
        # Onto the mask expanded ahead, or onto zeros: either way the count words move.
        clipped = honest_quantize(self, vector, delta, num_examples)
        with lock:
            if not liars:  # the first worker to mask lies (workers mask in threads)
                liars.append(self)
                ring = 1 << self.setup.fixed_point.ring_bits
                vector[delta.size] = (int(vector[delta.size]) - 60) % ring
        return clipped

    monkeypatch.setattr(SecAggClient, "quantize_onto", quantize_onto)
    coordinator, task = await coordinator_factory(config(rounds=1, min_workers=3, secagg=params))
    trainers = [ScriptedTrainer(1.0, 30), ScriptedTrainer(-0.5, 10), ScriptedTrainer(2.0, 20)]
    await asyncio.gather(
        *(run_worker(coordinator.port, f"w{i}", t) for i, t in enumerate(trainers))
    )
    result = await asyncio.wait_for(task, TIMEOUT)
    assert liars, "the attack never ran"
    assert "the masked example counts sum to 0, outside [3, 60]" in caplog.text
    mean_offset = (1.0 * 30 - 0.5 * 10 + 2.0 * 20) / 60
    step = params.clip / (2 ** (params.bits - 1) - 1)
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(result.weights[name], w0 + mean_offset, rtol=0, atol=4 * step)
    assert result.rounds[0].workers == 3
