"""The worker expands its whole mask ahead of its update (issue 28): once the key directory is
in (stop 33; before: once its shares arrived), in a thread, while the model downloads and
trains; the update is then only quantized onto it.

* the masked input is the same ring vector either way: a round mixing both unmasks to the
  exact plain sum;
* a mask of the wrong length is never used (the worker expands one itself);
* an abort forgets a prepared mask, and a mask prepared after an abort is never kept;
* through the worker's glue, the PRG runs when the directory arrives, before the relayed
  shares, not when the update is ready
  (positive control: a task whose header gives no length expands the mask at masking time).
"""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import numpy as np
import pytest

from fedcore.errors import SecAggError
from fedcore.secagg import SecAggParams, prg, wire
from fedcore.secagg.client import ClientRules, ClientState, SecAggClient
from fedcore.secagg.quantize import COUNT_WORDS
from fedcore.secagg.server import SecAggServer
from fedcore.secagg.setup import make_setup
from fedcore.secagg.simulation import exchange_shares
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights

N, D = 4, 1000
PARAMS = SecAggParams(clip=2.0, bits=20)
RULES = ClientRules(min_group_size=2, min_threshold=0.01)
RNG = np.random.default_rng(11)
DELTAS = [RNG.normal(0, 0.3, D).astype(np.float32) for _ in range(N)]
TIMEOUT = 10.0


def _ready_round() -> tuple[SecAggServer, dict[int, SecAggClient]]:
    setup = make_setup(PARAMS, N, 10 * N)
    clients = {
        u: SecAggClient(setup, rules=RULES, rounding_seed=u.to_bytes(32, "big"))
        for u in range(1, N + 1)
    }
    server = SecAggServer(setup, N, D + COUNT_WORDS, rng=random.Random(0))
    exchange_shares(server, clients)
    return server, clients


@pytest.mark.parametrize("prepared_length", [D + COUNT_WORDS, D + COUNT_WORDS + 1])
def test_a_round_mixing_masks_expanded_ahead_and_at_masking_time_unmasks_exactly(
    prepared_length: int,
) -> None:
    """Workers 1 and 2 expand their masks ahead (of the right length, or of a wrong one they
    must not use), 3 and 4 at masking time: the unmasked ring sum is the plain sum exactly."""
    server, clients = _ready_round()
    plain = np.zeros(D + COUNT_WORDS, clients[1].setup.fixed_point.dtype)
    for u, c in clients.items():
        np.add(plain, c.quantize(DELTAS[u - 1], 10)[0], out=plain)  # quantize keeps no state
        if u <= 2:
            c.prepare_mask(prepared_length)
        masked = c.mask(DELTAS[u - 1], 10)
        assert masked.vector.size == D + COUNT_WORDS
        server.add_masked(u, masked.vector)
    request = server.close_inputs()
    for u in server.recipients_of_shares_request():
        server.add_unmask(u, clients[u].unmask(request))
    result = server.finish()
    assert result.ring_sum.tobytes() == plain.tobytes()
    assert result.num_examples == 10 * N


def test_an_abort_forgets_a_prepared_mask_and_a_late_one_is_never_kept() -> None:
    _, clients = _ready_round()
    clients[1].prepare_mask(D + COUNT_WORDS)
    clients[1].abort()
    with pytest.raises(SecAggError, match="state aborted"):
        clients[1].mask(DELTAS[0], 10)
    # The round aborted before its mask was expanded (the thread started late): refused.
    clients[2].abort()
    with pytest.raises(SecAggError, match="state aborted"):
        clients[2].prepare_mask(D + COUNT_WORDS)
    assert clients[2].state is ClientState.ABORTED


class _CountedPRG:
    """Counts mask expansions (in whichever thread), and signals the first."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.first = threading.Event()
        real = prg.apply_masks

        def apply_masks(vector: Any, **seeds: Any) -> None:
            real(vector, **seeds)
            self.calls += 1
            self.first.set()

        monkeypatch.setattr(prg, "apply_masks", apply_masks)


async def _worker_round(
    monkeypatch: pytest.MonkeyPatch, header: pb.PayloadHeader
) -> tuple[int, int]:
    """Worker 1 through :class:`SecAggRounds` (the glue ``fed-worker`` runs), peers 2..N in
    memory; the round must unmask to the honest mean. Returns the mask expansions worker 1
    made before the relayed shares arrived, and while masking its update."""
    from fedcore.worker.secagg import SecAggRounds

    counted = _CountedPRG(monkeypatch)
    setup = make_setup(PARAMS, N, 10 * N)
    sent: list[pb.WorkerMessage] = []

    async def send(message: pb.WorkerMessage) -> None:
        sent.append(message)

    rounds = SecAggRounds(send, "w1")
    task = pb.Task(round=1, secagg=wire.setup_to_proto(setup), weights=header)
    await rounds.start(task, RULES)
    peers = {u: SecAggClient(setup, rules=RULES) for u in range(2, N + 1)}
    server = SecAggServer(setup, N, D + COUNT_WORDS, rng=random.Random(0))
    server.add_keys(1, wire.keys_from_proto(sent[-1].secagg.keys))
    for u, c in peers.items():
        server.add_keys(u, c.advertise())
    directories = server.close_keys()
    rid = setup.round_id
    await rounds.handle(
        pb.SecAggCoordinatorMessage(peers=wire.directory_to_proto(rid, directories[1]))
    )
    # The shares are not relayed yet: wait, bounded, for an expansion ahead of them.
    await asyncio.to_thread(counted.first.wait, 2.0)
    before = counted.calls
    server.add_shares(1, wire.shares_from_proto(sent[-1].secagg.shares))
    for u, c in peers.items():
        server.add_shares(u, c.share_keys(directories[u]))
    inboxes = server.close_shares()
    for u, c in peers.items():
        c.receive_shares(inboxes[u])
    await rounds.handle(pb.SecAggCoordinatorMessage(shares=wire.shares_to_proto(rid, inboxes[1])))
    received: Weights = {"w": np.zeros(D, np.float32)}
    updated: Weights = {"w": DELTAS[0]}
    vector = await asyncio.wait_for(
        rounds.mask(task, received, updated, is_delta=False, examples=10), TIMEOUT
    )
    masking = counted.calls - before
    server.add_masked(1, vector)
    for u, c in peers.items():
        server.add_masked(u, c.mask(DELTAS[u - 1], 10).vector)
    request = server.close_inputs()
    await rounds.handle(pb.SecAggCoordinatorMessage(unmask=wire.request_to_proto(rid, request)))
    server.add_unmask(1, wire.response_from_proto(sent[-1].secagg.unmask))
    for u, c in peers.items():
        server.add_unmask(u, c.unmask(request))
    result = server.finish()
    np.testing.assert_allclose(
        result.mean, np.mean(DELTAS, axis=0), atol=4 * N / setup.fixed_point.scale
    )
    return before, masking


async def test_the_worker_expands_its_mask_when_the_directory_arrives_not_after_training(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    header = pb.PayloadHeader(
        tensors=[pb.TensorSpec(name="w", dtype=pb.DTYPE_FLOAT32, shape=[D])], total_bytes=4 * D
    )
    ahead, masking = await _worker_round(monkeypatch, header)
    assert ahead == 1, "the mask was not expanded ahead of the update"
    assert masking == 0, "masking expanded the PRG again"


async def test_control_without_a_length_in_the_header_the_mask_is_expanded_at_masking_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No tensors: a 2-word mask is prepared, which the update's length does not match.
    ahead, masking = await _worker_round(monkeypatch, pb.PayloadHeader())
    assert ahead == 1
    assert masking == 1
