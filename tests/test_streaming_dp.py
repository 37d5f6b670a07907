"""The central-DP wrapper streams, and the coordinator still enforces the clip.

* uploads are spooled chunk by chunk; the clip factor comes from the values received, so a
  worker that sends an unclipped update still adds at most ``C`` to the sum (attack test with
  its positive control);
* a streamed update adds exactly what the same update added whole does (bit for bit), and
  what :func:`clip_update` would have (to float tolerance);
* an upload cut after any chunk, or poisoned, never reaches the sum;
* uploads proceed concurrently through the inbox; N uploads in flight hold the float64 sum,
  not N models.
"""

from __future__ import annotations

import asyncio
import math
import tracemalloc
from typing import Any

import numpy as np
import pytest
from interleaved import feed_interleaved, stream_interleaved

from fedcore.codec import iter_chunks, make_header
from fedcore.errors import PayloadError
from fedcore.plan import TrainConfig
from fedcore.privacy import DifferentialPrivacy, UniformDeltaAggregator, clip_update, l2_norm
from fedcore.server.engine.collectors import FitCollector
from fedcore.server.state.registry import SessionState, Ticket, WorkerSession
from fedcore.server.transport.inbox import Inbox
from fedcore.server.transport.upload_stream import StreamedUpload, layout_of
from fedcore.strategy import FedAvg, UpdateAccess, WorkerInfo
from fedcore.strategy.spool import RANGE_BYTES
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights, signature_of

CLIP = 0.5
RNG = np.random.default_rng(5)
BIG = RANGE_BYTES // 8 + 777  # spans two of the aggregator's ranges
GLOBAL: Weights = {
    "conv": RNG.normal(0, 0.1, (3, 5)).astype(np.float32),
    "steps": np.array([40], np.int64),
    "big": RNG.normal(0, 0.1, BIG).astype(np.float32),
}
SIGNATURE = signature_of(GLOBAL)
CHUNK = 4099  # odd: chunks cut elements in two
TOTAL = sum(a.nbytes for a in GLOBAL.values())


def _update(norm: float) -> Weights:
    """Full weights whose float delta from GLOBAL has about ``norm``."""
    out: Weights = {}
    for name, base in GLOBAL.items():
        if base.dtype.kind == "f":
            step = RNG.normal(0, 1, base.shape) * norm / math.sqrt(BIG + 15)
            out[name] = (base + step).astype(base.dtype)
        else:
            out[name] = base + 3
    return out


# Two within the clip, two far beyond it (one of them the "attacker": 40 C).
UPDATES = [_update(0.2), _update(3.0), _update(0.4), _update(40 * CLIP)]


def _add_all(upload: StreamedUpload, chunks: list[pb.PayloadChunk]) -> None:
    for chunk in chunks:
        upload.add(chunk)


def _chunks(update: Weights) -> list[pb.PayloadChunk]:
    return [
        pb.PayloadChunk(index=i, data=bytes(d)) for i, d in enumerate(iter_chunks(update, CHUNK))
    ]


def _aggregator() -> UniformDeltaAggregator:
    dp = DifferentialPrivacy(FedAvg(), noise_multiplier=1.0, clipping_norm=CLIP)
    dp.configure_fit(1, [WorkerInfo(f"w{i}", f"w{i}", 10) for i in range(4)], TrainConfig())
    aggregator = dp.start_aggregation(1, GLOBAL)
    assert isinstance(aggregator, UniformDeltaAggregator)
    aggregator.expect(40.0)
    return aggregator


def _upload(aggregator: UniformDeltaAggregator, *, base: Weights | None = None) -> StreamedUpload:
    return StreamedUpload(
        SIGNATURE,
        total_bytes=TOTAL,
        chunk_bytes=CHUNK,
        stream=aggregator.open(layout_of(SIGNATURE), 10),
        base=base,
        what="test upload",
    )


def _stream(aggregator: UniformDeltaAggregator, update: Weights) -> None:
    upload = _upload(aggregator)
    for chunk in _chunks(update):
        upload.add(chunk)
    assert aggregator.commit(upload.stream, 10)


def _sum_bytes(aggregator: UniformDeltaAggregator) -> dict[str, bytes]:
    return {k: v.tobytes() for k, v in aggregator.delta_sum().items()}


def _delta(update: Weights) -> dict[str, np.ndarray]:
    return {
        k: np.subtract(v, GLOBAL[k], dtype=np.float64)
        for k, v in update.items()
        if v.dtype.kind == "f"
    }


def test_the_dp_wrapper_declares_streaming() -> None:
    assert DifferentialPrivacy.update_access is UpdateAccess.STREAM


def test_an_unclipped_streamed_update_adds_at_most_the_clip() -> None:
    # Positive control: an honest update within the clip is folded unchanged.
    honest = _aggregator()
    _stream(honest, UPDATES[0])
    for name, delta in _delta(UPDATES[0]).items():
        assert honest.delta_sum()[name].tobytes() == delta.tobytes()
    # The attack: a worker skips clipping and sends 40 C; the coordinator clips it to C.
    attacked = _aggregator()
    _stream(attacked, UPDATES[-1])
    assert l2_norm(_delta(UPDATES[-1])) > 39 * CLIP
    assert l2_norm(attacked.delta_sum()) <= CLIP


def test_a_streamed_update_adds_what_a_whole_one_does() -> None:
    streamed, whole = _aggregator(), _aggregator()
    uploads = [(_upload(streamed), _chunks(u)) for u in UPDATES]
    for index in range(len(uploads[0][1])):  # every upload in flight at once
        for upload, chunks in uploads:
            upload.add(chunks[index])
    for upload, _ in uploads:
        assert streamed.commit(upload.stream, 10)
    for update in UPDATES:
        whole.add({k: v.copy() for k, v in update.items()}, 10)
    assert _sum_bytes(streamed) == _sum_bytes(whole)
    assert streamed.units == whole.units == len(UPDATES)
    assert streamed.result()["big"].tobytes() == whole.result()["big"].tobytes()
    # ... and what the coordinator's clip_update did before it streamed.
    reference = {k: np.zeros(v.size) for k, v in GLOBAL.items() if v.dtype.kind == "f"}
    for update in UPDATES:
        for name, d in clip_update(_delta(update), CLIP).update.items():
            reference[name] += d.reshape(-1)
    # Both shrink the factor by 1e-7 steps when rounding puts the scaled norm a hair above C;
    # their norms round differently (fsum of range dots here, one dot per tensor there).
    for name, total in streamed.delta_sum().items():
        np.testing.assert_allclose(total.reshape(-1), reference[name], rtol=1e-6, atol=1e-8)


def test_a_delta_upload_adds_what_the_same_weights_do() -> None:
    streamed, whole = _aggregator(), _aggregator()
    for update in UPDATES:
        delta = {k: (v - GLOBAL[k]).astype(v.dtype) for k, v in update.items()}
        upload = _upload(streamed, base=GLOBAL)
        for chunk in _chunks(delta):
            upload.add(chunk)
        assert streamed.commit(upload.stream, 10)
        whole.add({k: np.add(d, GLOBAL[k], dtype=d.dtype) for k, d in delta.items()}, 10)
    assert _sum_bytes(streamed) == _sum_bytes(whole)


def test_a_cut_after_any_chunk_never_reaches_the_sum() -> None:
    expected = _aggregator()
    for update in UPDATES[:2]:
        expected.add({k: v.copy() for k, v in update.items()}, 10)
    chunks = _chunks(UPDATES[-1])
    for cut in range(len(chunks) + 1):
        aggregator = _aggregator()
        upload = _upload(aggregator)
        for i, chunk in enumerate(chunks[:cut]):
            upload.add(chunk)
            if i == 0:  # the others commit while the cut one is in flight
                for update in UPDATES[:2]:
                    aggregator.add({k: v.copy() for k, v in update.items()}, 10)
        upload.abort()
        assert not aggregator.commit(upload.stream, 10)
        if cut == 0:
            for update in UPDATES[:2]:
                aggregator.add({k: v.copy() for k, v in update.items()}, 10)
        assert aggregator.units == 2
        assert _sum_bytes(aggregator) == _sum_bytes(expected)


def test_an_upload_still_open_at_the_end_never_counts() -> None:
    aggregator = _aggregator()
    aggregator.add({k: v.copy() for k, v in UPDATES[0].items()}, 10)
    upload = _upload(aggregator)
    for chunk in _chunks(UPDATES[1]):
        upload.add(chunk)
    aggregator.result()
    assert aggregator.units == 1
    assert not aggregator.commit(upload.stream, 10)


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_a_poisoned_chunk_is_refused(poison: float) -> None:
    aggregator = _aggregator()
    bad = {k: v.copy() for k, v in UPDATES[0].items()}
    bad["big"][7] = poison
    upload = _upload(aggregator)
    with pytest.raises(PayloadError, match="NaN or Inf"):
        _add_all(upload, _chunks(bad))
    upload.abort()
    _stream(aggregator, UPDATES[0])  # positive control: the clean one goes through
    assert aggregator.units == 1


def _session(name: str, collector: FitCollector, task: str) -> tuple[WorkerSession, Ticket]:
    session = WorkerSession(name, pb.Hello(name=name, num_examples=1000), "test")
    session.transition(SessionState.IDLE)
    ticket = Ticket(task, 1, pb.TASK_KIND_FIT, session, collector=collector)
    collector.tickets.append(ticket)
    session.assign(ticket)
    return session, ticket


async def _interleaved() -> tuple[FitCollector, UniformDeltaAggregator]:
    """Four uploads on four inboxes sharing ONE upload slot, their chunks interleaved."""
    aggregator = _aggregator()
    collector = FitCollector(1, aggregator, GLOBAL, weight_budget=4000.0)
    slots = asyncio.Semaphore(1)
    inboxes = []
    for i, update in enumerate(UPDATES):
        session, _ = _session(f"w{i}", collector, f"t{i}")
        inbox = Inbox(
            session,
            signature=SIGNATURE,
            max_model_bytes=4 * TOTAL,
            chunk_limit=CHUNK,
            upload_slots=slots,
        )
        result = pb.WorkerMessage(
            result=pb.TaskResult(
                task_id=f"t{i}",
                num_examples=10,
                update=make_header(update, CHUNK),
                update_kind=pb.UPDATE_KIND_WEIGHTS,
            )
        )
        inboxes.append((inbox, result, _chunks(update)))
    await feed_interleaved(inboxes)
    return collector, aggregator


def test_uploads_proceed_concurrently_through_the_inbox() -> None:
    collector, aggregator = asyncio.run(_interleaved())
    assert collector.reported == len(UPDATES)
    whole = _aggregator()
    for update in UPDATES:
        whole.add({k: v.copy() for k, v in update.items()}, 10)
    assert _sum_bytes(aggregator) == _sum_bytes(whole)


def test_memory_stays_o_model_with_n_uploads_in_flight() -> None:
    """8 clipped uploads of a 2M-parameter model in flight at once: the coordinator holds the
    float64 sum (2 float32 models) and a range, not the 8 models that staging would."""
    params, n_uploads, chunk = 2_000_000, 8, 1 << 20
    model: Weights = {"w": np.zeros(params, np.float32)}
    signature = signature_of(model)
    payloads = [
        [bytes(d) for d in iter_chunks({"w": np.full(params, 0.01 * (i + 1), np.float32)}, chunk)]
        for i in range(n_uploads)
    ]
    model_bytes = params * 4
    tracemalloc.start()
    try:
        aggregator = UniformDeltaAggregator(model, enforce_clip=1.0)
        stream_interleaved(
            aggregator, signature, payloads, total_bytes=model_bytes, chunk_bytes=chunk
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Each update (norm 0.01 (i+1) sqrt(2e6) > 1) was clipped to norm 1.
    assert l2_norm(aggregator.delta_sum()) == pytest.approx(n_uploads, rel=1e-6)
    assert peak < 2.25 * model_bytes, f"peak {peak / model_bytes:.2f} models"


def test_an_abort_while_the_norm_is_computed_ends_the_upload_quietly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    aggregator = _aggregator()
    upload = _upload(aggregator)
    chunks = _chunks(UPDATES[1])
    _add_all(upload, chunks[:-1])
    stream = upload.stream
    original = aggregator.scale_of

    def abort_midway(read: Any) -> float:
        read("big", 0, 10)  # positive control: readable while complete and open
        stream.abort()  # the round ends in another thread
        return original(read)

    monkeypatch.setattr(aggregator, "scale_of", abort_midway)
    upload.add(chunks[-1])  # no error: the upload just ends
    assert not aggregator.commit(stream, 10)
    assert aggregator.units == 0
