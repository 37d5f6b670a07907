"""Secure aggregation streams: masked inputs are added to the ring sum chunk by chunk.

* streamed, interleaved inputs unmask to exactly the plain quantized sum, as whole inputs do;
* an input cut after any chunk is subtracted again: its sender counts as dropped, and the
  round unmasks the others' sum exactly;
* an input still streaming when phase 3 closes is taken back out and cannot commit later;
* a second input from the same participant is refused (with its positive control);
* N inputs in flight hold one ring vector, not N inputs;
* the coordinator's secure rounds take the streaming path end to end.
"""

from __future__ import annotations

import asyncio
import random
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from test_coordinator import TIMEOUT, ScriptedTrainer, config, initial_weights, run_worker

from fedcore.errors import PayloadError, SecAggError
from fedcore.secagg import SecAggParams
from fedcore.secagg.client import ClientRules, SecAggClient
from fedcore.secagg.ring import MaskedInputStream, RingSum
from fedcore.secagg.server import AggregateResult, SecAggServer
from fedcore.secagg.setup import make_setup
from fedcore.secagg.wire import MASKED_TENSOR
from fedcore.server.transport.upload_stream import StreamedUpload
from fedcore.strategy.journal import DEFAULT_JOURNAL_MEMORY
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import TensorSignature

PARAMS = SecAggParams(clip=4.0, bits=24, phase_timeout=5.0)
RULES = ClientRules(min_group_size=2, min_threshold=0.01)
N, D = 4, 61
CHUNK = 37  # odd: chunks cut ring words in two
RNG = np.random.default_rng(3)
DELTAS = [RNG.normal(0, 0.5, D) for _ in range(N)]
COUNTS = [10, 20, 30, 40]

Feed = Callable[[SecAggServer, dict[int, np.ndarray]], None]


def _round(feed: Feed) -> tuple[AggregateResult, dict[int, np.ndarray]]:
    """One unsigned round of N workers; ``feed`` delivers the masked inputs in phase 3.
    Returns the result and every worker's plain quantized vector."""
    setup = make_setup(PARAMS, N, sum(COUNTS), members=[], job="test")
    clients = {
        i + 1: SecAggClient(setup, rules=RULES, rounding_seed=i.to_bytes(32, "big"))
        for i in range(N)
    }
    server = SecAggServer(setup, N, D + 2, rng=random.Random(0))
    for u, client in clients.items():
        server.add_keys(u, client.advertise())
    directories = server.close_keys()
    for u, client in clients.items():
        server.add_shares(u, client.share_keys(directories[u]))
    inboxes = server.close_shares()
    plain, masked = {}, {}
    for u, client in clients.items():
        client.receive_shares(inboxes[u])
        vector, _ = client.quantize(DELTAS[u - 1], COUNTS[u - 1])
        plain[u] = vector.copy()
        client.mask_vector(vector)
        masked[u] = vector
    feed(server, masked)
    request = server.close_inputs()
    for u in server.recipients_of_shares_request():
        server.add_unmask(u, clients[u].unmask(request))
    return server.finish(), plain


def _plain_sum(plain: dict[int, np.ndarray], who: set[int] | frozenset[int]) -> np.ndarray:
    total = np.zeros_like(plain[1])
    for u in sorted(who):
        np.add(total, plain[u], out=total)
    return total


def _upload(stream: MaskedInputStream, vector: np.ndarray) -> StreamedUpload:
    signature = (TensorSignature(MASKED_TENSOR, vector.dtype.name, (vector.size,)),)
    return StreamedUpload(
        signature,
        total_bytes=vector.nbytes,
        chunk_bytes=CHUNK,
        stream=stream,
        base=None,
        what="masked input",
    )


def _chunks(vector: np.ndarray) -> list[pb.PayloadChunk]:
    data = vector.tobytes()
    return [
        pb.PayloadChunk(index=i, data=data[lo : lo + CHUNK])
        for i, lo in enumerate(range(0, len(data), CHUNK))
    ]


def _whole(server: SecAggServer, masked: dict[int, np.ndarray]) -> None:
    for u, vector in masked.items():
        server.add_masked(u, vector)


def _interleaved(server: SecAggServer, masked: dict[int, np.ndarray]) -> None:
    uploads = {u: _upload(server.open_masked(u), v) for u, v in masked.items()}
    chunks = {u: _chunks(v) for u, v in masked.items()}
    for index in range(len(chunks[1])):
        for u, upload in uploads.items():
            upload.add(chunks[u][index])
    for upload in uploads.values():
        assert upload.complete
        assert upload.stream.commit()


def test_streamed_inputs_unmask_to_the_plain_sum_as_whole_ones_do() -> None:
    streamed, plain = _round(_interleaved)
    whole, _ = _round(_whole)
    assert streamed.contributors == frozenset(range(1, N + 1))
    assert streamed.ring_sum.tobytes() == _plain_sum(plain, streamed.contributors).tobytes()
    assert streamed.ring_sum.tobytes() == whole.ring_sum.tobytes()
    assert streamed.num_examples == sum(COUNTS)


def test_an_input_cut_after_any_chunk_is_subtracted_and_its_sender_dropped() -> None:
    sizes: list[int] = []

    def count_chunks(server: SecAggServer, masked: dict[int, np.ndarray]) -> None:
        sizes.append(len(_chunks(masked[1])))
        _whole(server, masked)

    _round(count_chunks)
    for cut in range(sizes[0] + 1):

        def feed(server: SecAggServer, masked: dict[int, np.ndarray], cut: int = cut) -> None:
            victim = _upload(server.open_masked(4), masked[4])
            for chunk in _chunks(masked[4])[:cut]:
                victim.add(chunk)
            _whole(server, {u: v for u, v in masked.items() if u != 4})
            victim.abort()
            assert not victim.stream.commit()

        result, plain = _round(feed)
        assert result.contributors == frozenset({1, 2, 3})
        assert result.ring_sum.tobytes() == _plain_sum(plain, {1, 2, 3}).tobytes()


def test_an_input_still_streaming_when_phase_3_closes_is_taken_back() -> None:
    late: list[StreamedUpload] = []

    def feed(server: SecAggServer, masked: dict[int, np.ndarray]) -> None:
        _whole(server, {u: v for u, v in masked.items() if u != 2})
        upload = _upload(server.open_masked(2), masked[2])
        chunks = _chunks(masked[2])
        for chunk in chunks[:-1]:
            upload.add(chunk)
        late.append(upload)

    result, plain = _round(feed)
    assert result.contributors == frozenset({1, 3, 4})
    assert result.ring_sum.tobytes() == _plain_sum(plain, {1, 3, 4}).tobytes()
    assert not late[0].stream.commit()  # the rest arriving now changes nothing


def test_a_second_input_from_the_same_participant_is_refused() -> None:
    def feed(server: SecAggServer, masked: dict[int, np.ndarray]) -> None:
        upload = _upload(server.open_masked(1), masked[1])  # positive control: accepted
        for chunk in _chunks(masked[1]):
            upload.add(chunk)
        assert upload.stream.commit()
        with pytest.raises(SecAggError, match="unexpected masked input"):
            server.open_masked(1)
        with pytest.raises(SecAggError, match="unexpected masked input"):
            server.add_masked(1, masked[1])
        other = server.open_masked(2)
        with pytest.raises(SecAggError, match="unexpected masked input"):
            server.add_masked(2, masked[2])  # the same sender, streaming and whole at once
        with pytest.raises(PayloadError, match="does not follow"):
            other.fold(MASKED_TENSOR, 5, masked[2][5:9])
        _whole(server, {3: masked[3], 4: masked[4]})
        other.abort()

    result, plain = _round(feed)
    assert result.contributors == frozenset({1, 3, 4})
    assert result.ring_sum.tobytes() == _plain_sum(plain, {1, 3, 4}).tobytes()


async def test_the_coordinators_secure_rounds_stream(
    coordinator_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[int] = []
    original = SecAggServer.open_masked

    def spy(self: SecAggServer, index: int) -> MaskedInputStream:
        opened.append(index)
        return original(self, index)

    monkeypatch.setattr(SecAggServer, "open_masked", spy)
    coordinator, task = await coordinator_factory(config(rounds=1, min_workers=3, secagg=PARAMS))
    trainers = [ScriptedTrainer(1.0, 30), ScriptedTrainer(-0.5, 10), ScriptedTrainer(2.0, 20)]
    await asyncio.gather(
        *(run_worker(coordinator.port, f"w{i}", t) for i, t in enumerate(trainers))
    )
    result = await asyncio.wait_for(task, TIMEOUT)
    assert sorted(opened) == [1, 2, 3]
    mean_offset = (1.0 * 30 - 0.5 * 10 + 2.0 * 20) / 60
    step = PARAMS.clip / (2 ** (PARAMS.bits - 1) - 1)
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(result.weights[name], w0 + mean_offset, rtol=0, atol=4 * step)


@pytest.mark.parametrize("journal_memory", [0, DEFAULT_JOURNAL_MEMORY])
def test_memory_stays_one_ring_vector_with_n_inputs_in_flight(journal_memory: int) -> None:
    """8 masked inputs of 2M words (8 MB each) in flight at once, chunks interleaved: the
    coordinator holds the ring vector, a chunk and at most the journals' memory budget
    (received chunks kept by reference), not the 8 inputs staging would."""
    words, n_inputs, chunk = 2_000_000, 8, 1 << 20
    rng = np.random.default_rng(1)
    vectors = [rng.integers(0, 2**32, words, dtype=np.uint32) for _ in range(n_inputs)]
    payloads = [[v.tobytes()[lo : lo + chunk] for lo in range(0, v.nbytes, chunk)] for v in vectors]
    expected = np.zeros(words, np.uint32)
    for v in vectors:
        np.add(expected, v, out=expected)
    del vectors
    vector_bytes = words * 4
    tracemalloc.start()
    try:
        ring = RingSum(words, np.dtype(np.uint32), journal_memory=journal_memory)
        uploads = []
        for u in range(n_inputs):
            signature = (TensorSignature(MASKED_TENSOR, "uint32", (words,)),)
            stream = ring.open(u + 1, lambda index: True)
            uploads.append(
                StreamedUpload(
                    signature,
                    total_bytes=vector_bytes,
                    chunk_bytes=chunk,
                    stream=stream,
                    base=None,
                    what=f"input {u}",
                )
            )
        for index in range(len(payloads[0])):
            for upload, chunks in zip(uploads, payloads, strict=True):
                upload.add(pb.PayloadChunk(index=index, data=chunks[index]))
        for upload in uploads:
            assert upload.stream.commit()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ring.vector.tobytes() == expected.tobytes()
    bound = 1.5 * vector_bytes + journal_memory
    assert peak < bound, f"peak {peak / vector_bytes:.2f} ring vectors"


@pytest.mark.parametrize("journal_memory", [0, 3 * CHUNK, DEFAULT_JOURNAL_MEMORY])
def test_a_cut_input_leaves_the_ring_exact_whether_its_journal_is_in_memory_or_spilled(
    journal_memory: int,
) -> None:
    """The take-back journal keeps received chunks by reference up to its budget, then spills
    to disk: a cut after every chunk leaves exactly the committed input, in memory (the
    default), split between the two, and all spilled. The positive control: the committed
    input alone is in the sum, so a take-back that missed a piece would show."""
    kept, cut = (RNG.integers(0, 2**32, 50, dtype=np.uint32) for _ in range(2))
    chunks = _chunks(cut)
    for after in range(len(chunks) + 1):
        ring = RingSum(kept.size, np.dtype(np.uint32), journal_memory=journal_memory)
        whole = _upload(ring.open(1, lambda index: True), kept)
        for chunk in _chunks(kept):
            whole.add(chunk)
        cut_off = _upload(ring.open(2, lambda index: True), cut)
        for chunk in chunks[:after]:
            cut_off.add(chunk)
        if after:
            assert ring.vector.tobytes() != kept.tobytes()  # the cut input's words are in it
        cut_off.stream.abort()
        assert whole.stream.commit()
        assert ring.vector.tobytes() == kept.tobytes(), f"cut after {after} chunk(s)"
