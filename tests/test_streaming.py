"""Streaming aggregation: uploads folded chunk by chunk, in parallel, at O(model) memory.

* a streamed update folds exactly what a whole one does (bit-identical results, for every
  streaming strategy and for weight and delta updates);
* an upload cut off after any chunk, or found bad at any chunk, is taken back out exactly;
* uploads proceed concurrently (with one upload slot, which serialises staged uploads);
* N uploads in flight hold the aggregate and a few chunks, not N staged models.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from interleaved import feed_interleaved, stream_interleaved

from fedcore.codec import iter_chunks, make_header
from fedcore.errors import PayloadError, ProtocolError
from fedcore.server.engine.collectors import FitCollector
from fedcore.server.state.registry import SessionState, Ticket, WorkerSession
from fedcore.server.transport.inbox import Inbox
from fedcore.server.transport.upload_stream import StreamedUpload, layout_of
from fedcore.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    FitResult,
    Strategy,
    StreamingAggregator,
    UpdateAccess,
    WeightedMeanAggregator,
    WorkerInfo,
)
from fedcore.strategy.journal import DEFAULT_JOURNAL_MEMORY
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights, signature_of

RNG = np.random.default_rng(7)
GLOBAL: Weights = {
    "conv": RNG.normal(0, 0.1, (3, 5)).astype(np.float32),
    "steps": np.array([40], np.int64),
    "fc": RNG.normal(0, 0.1, 11).astype(np.float32),
}
SIGNATURE = signature_of(GLOBAL)
CHUNK = 13  # odd: chunks cut elements (float32 and int64) in two
TOTAL = sum(a.nbytes for a in GLOBAL.values())
UPDATES: list[tuple[Weights, int]] = [
    ({k: (v + RNG.normal(0, 0.05, v.shape)).astype(v.dtype) for k, v in GLOBAL.items()}, n)
    for n in (30, 7, 120)
]
BUDGET = 200.0


def _chunks(update: Weights) -> list[pb.PayloadChunk]:
    return [
        pb.PayloadChunk(index=i, data=bytes(d)) for i, d in enumerate(iter_chunks(update, CHUNK))
    ]


def _streamed(
    aggregator: StreamingAggregator, update: Weights, n: int, *, base: Weights | None = None
) -> StreamedUpload:
    return StreamedUpload(
        SIGNATURE,
        total_bytes=TOTAL,
        chunk_bytes=CHUNK,
        stream=aggregator.open(layout_of(SIGNATURE), n),
        base=base,
        what="test upload",
    )


def _add_all(upload: StreamedUpload, chunks: list[pb.PayloadChunk]) -> None:
    for chunk in chunks:
        upload.add(chunk)


async def _send_all(inbox: Inbox, chunks: list[pb.PayloadChunk]) -> None:
    for chunk in chunks:
        await inbox.on_chunk(chunk)


def _stream_all(aggregator: StreamingAggregator, updates: list[tuple[Weights, int]]) -> None:
    for update, n in updates:
        upload = _streamed(aggregator, update, n)
        for chunk in _chunks(update):
            upload.add(chunk)
        assert upload.complete
        assert aggregator.commit(upload.stream, n)


def _bytes(weights: Weights) -> bytes:
    return b"".join(weights[k].tobytes() for k in sorted(weights))


def _whole_mean() -> Weights:
    whole = WeightedMeanAggregator(weight_budget=BUDGET)
    for update, n in UPDATES:
        whole.add({k: v.copy() for k, v in update.items()}, n)
    return whole.result()


def test_a_streamed_update_folds_exactly_what_a_whole_one_does() -> None:
    streamed = WeightedMeanAggregator()
    streamed.expect(BUDGET)
    _stream_all(streamed, UPDATES)
    assert _bytes(streamed.result()) == _bytes(_whole_mean())
    # And a delta update (the worker sends update - global) folds the same integers.
    deltas = WeightedMeanAggregator()
    deltas.expect(BUDGET)
    for update, n in UPDATES:
        delta = {k: np.subtract(v, GLOBAL[k], dtype=v.dtype) for k, v in update.items()}
        upload = _streamed(deltas, delta, n, base=GLOBAL)
        for chunk in _chunks(delta):
            upload.add(chunk)
        assert deltas.commit(upload.stream, n)
    reference = WeightedMeanAggregator(weight_budget=BUDGET)
    for update, n in UPDATES:
        delta = {k: np.subtract(v, GLOBAL[k], dtype=v.dtype) for k, v in update.items()}
        for k, d in delta.items():  # what the whole-update path does with a delta
            np.add(d, GLOBAL[k], out=d, casting="unsafe")
        reference.add(delta, n)
    assert _bytes(deltas.result()) == _bytes(reference.result())


def test_the_mean_is_within_its_stated_bound_of_the_exact_mean() -> None:
    got = _whole_mean()
    weight = sum(n for _, n in UPDATES)
    for name in ("conv", "fc"):
        exact = sum(u[name].astype(np.float64) * n for u, n in UPDATES) / weight
        # float32 rounding of the result dominates the fixed point's N * 2**-F / W.
        np.testing.assert_allclose(got[name], exact, rtol=2**-23, atol=2**-30)
    assert got["steps"].dtype == np.int64


@pytest.mark.parametrize("make", [FedAvg, FedProx, FedAvgM, FedAdam, FedYogi])
def test_each_streaming_strategy_gives_its_whole_update_result(
    make: Callable[[], Strategy],
) -> None:
    outcomes = []
    for streaming in (True, False):
        strategy = make()
        assert strategy.update_access is UpdateAccess.STREAM
        aggregator = strategy.start_aggregation(1, GLOBAL)
        assert isinstance(aggregator, StreamingAggregator)
        aggregator.expect(BUDGET)
        if streaming:
            _stream_all(aggregator, UPDATES)
        else:
            for update, n in UPDATES:
                aggregator.add({k: v.copy() for k, v in update.items()}, n)
        info = WorkerInfo("w", "w", 1)
        results = [FitResult(info, n) for _, n in UPDATES]
        weights = strategy.aggregate_fit(1, GLOBAL, aggregator.result(), results, [])
        outcomes.append(_bytes(weights))
    assert outcomes[0] == outcomes[1]


def test_krum_and_fedbuff_declare_whole_updates() -> None:
    from fedcore.strategy import FedBuff, Krum

    # Median and trimmed mean stream through a spool: tests/test_streaming_robust.py.
    for strategy in (Krum(), FedBuff()):
        assert strategy.update_access is UpdateAccess.WHOLE


def test_a_cut_after_any_chunk_leaves_the_aggregate_exact() -> None:
    expected = _bytes(_whole_mean())
    cut_update = {k: v * np.asarray(3, v.dtype) for k, v in UPDATES[0][0].items()}
    chunks = _chunks(cut_update)
    assert len(chunks) > 8
    for cut in range(len(chunks) + 1):
        aggregator = WeightedMeanAggregator()
        aggregator.expect(BUDGET + 50)
        _stream_all(aggregator, UPDATES[:1])
        upload = _streamed(aggregator, cut_update, 50)
        for chunk in chunks[:cut]:
            upload.add(chunk)
        _stream_all(aggregator, UPDATES[1:])  # others fold while it is in flight
        upload.abort()  # the worker left
        assert _bytes(aggregator.result()) == expected, f"cut after {cut} chunks"


@pytest.mark.parametrize("poison", [np.nan, np.inf, 2.0**30])
def test_a_bad_chunk_is_refused_and_the_folded_part_taken_back(poison: float) -> None:
    expected = _bytes(_whole_mean())
    for bad_at in (0, 5, 13):  # the first, a middle and the last float of "fc"
        bad = {k: v.copy() for k, v in UPDATES[0][0].items()}
        bad["fc"][min(bad_at, 10)] = poison
        aggregator = WeightedMeanAggregator()
        aggregator.expect(BUDGET + 50)
        _stream_all(aggregator, UPDATES)
        upload = _streamed(aggregator, bad, 50)
        with pytest.raises(PayloadError, match=r"NaN or Inf|beyond the exact"):
            _add_all(upload, _chunks(bad))
        upload.abort()
        assert _bytes(aggregator.result()) == expected
    # Positive control: the same harness takes the clean update.
    aggregator = WeightedMeanAggregator()
    aggregator.expect(BUDGET)
    _stream_all(aggregator, UPDATES)
    assert aggregator.count == len(UPDATES)


def test_a_stream_left_open_never_counts() -> None:
    aggregator = WeightedMeanAggregator()
    aggregator.expect(BUDGET + 50)
    _stream_all(aggregator, UPDATES)
    upload = _streamed(aggregator, UPDATES[0][0], 50)
    for chunk in _chunks(UPDATES[0][0])[:3]:
        upload.add(chunk)
    assert _bytes(aggregator.result()) == _bytes(_whole_mean())  # result() takes it back
    assert not aggregator.commit(upload.stream, 50)  # too late now


def test_the_weight_budget_is_enforced() -> None:
    aggregator = WeightedMeanAggregator()
    aggregator.expect(100)
    held = aggregator.open(layout_of(SIGNATURE), 60)
    with pytest.raises(ValueError, match="weight budget"):
        aggregator.open(layout_of(SIGNATURE), 41)
    held.abort()  # its weight comes back
    aggregator.open(layout_of(SIGNATURE), 100).abort()


# ---------------------------------------------------------------- through the inbox


def _session(name: str, collector: FitCollector, task: str) -> tuple[WorkerSession, Ticket]:
    session = WorkerSession(name, pb.Hello(name=name, num_examples=1000), "test")
    session.transition(SessionState.IDLE)
    ticket = Ticket(task, 1, pb.TASK_KIND_FIT, session, collector=collector)
    collector.tickets.append(ticket)
    session.assign(ticket)
    return session, ticket


def _result(task: str, update: Weights, n: int) -> pb.WorkerMessage:
    return pb.WorkerMessage(
        result=pb.TaskResult(
            task_id=task,
            num_examples=n,
            update=make_header(update, CHUNK),
            update_kind=pb.UPDATE_KIND_WEIGHTS,
        )
    )


async def _interleaved(streaming: bool) -> FitCollector:
    """Three uploads on three inboxes sharing ONE upload slot, their chunks interleaved."""
    budget = 300.0 if streaming else None
    collector = FitCollector(1, WeightedMeanAggregator(weight_budget=300), GLOBAL)
    if streaming:
        collector = FitCollector(1, WeightedMeanAggregator(), GLOBAL, weight_budget=budget)
    slots = asyncio.Semaphore(1)
    inboxes = []
    for i, (update, n) in enumerate(UPDATES):
        session, _ = _session(f"w{i}", collector, f"t{i}")
        inbox = Inbox(
            session,
            signature=SIGNATURE,
            max_model_bytes=4096,
            chunk_limit=CHUNK,
            upload_slots=slots,
        )
        inboxes.append((inbox, _result(f"t{i}", update, n), _chunks(update)))
    await feed_interleaved(inboxes)
    return collector


def test_uploads_proceed_concurrently_when_the_strategy_streams() -> None:
    collector = asyncio.run(_interleaved(streaming=True))
    assert collector.reported == len(UPDATES)
    assert _bytes(collector.aggregator.result()) == _bytes(_whole_mean_with_budget(300.0))
    # Positive control: staged uploads with one slot are serialised, so the second upload
    # cannot even start while the first one holds the slot.
    with pytest.raises(TimeoutError):
        asyncio.run(_interleaved(streaming=False))


def _whole_mean_with_budget(budget: float) -> Weights:
    whole = WeightedMeanAggregator(weight_budget=budget)
    for update, n in UPDATES:
        whole.add({k: v.copy() for k, v in update.items()}, n)
    return whole.result()


async def _cut_in_inbox(cut: int) -> tuple[FitCollector, int]:
    collector = FitCollector(1, WeightedMeanAggregator(), GLOBAL, weight_budget=400.0)
    honest = []
    for i, (update, n) in enumerate(UPDATES):
        session, _ = _session(f"w{i}", collector, f"t{i}")
        honest.append(
            (
                Inbox(
                    session,
                    signature=SIGNATURE,
                    max_model_bytes=4096,
                    chunk_limit=CHUNK,
                    upload_slots=asyncio.Semaphore(1),
                ),
                _result(f"t{i}", update, n),
                _chunks(update),
            )
        )
    session, _ = _session("cut", collector, "tc")
    cut_inbox = Inbox(
        session,
        signature=SIGNATURE,
        max_model_bytes=4096,
        chunk_limit=CHUNK,
        upload_slots=asyncio.Semaphore(1),
    )
    evil = {k: v * np.asarray(5, v.dtype) for k, v in GLOBAL.items()}
    await cut_inbox.handle(_result("tc", evil, 90))
    for chunk in _chunks(evil)[:cut]:
        await cut_inbox.on_chunk(chunk)
    for inbox, result, chunks in honest:
        await inbox.handle(result)
        for chunk in chunks:
            await inbox.on_chunk(chunk)
    session.close("connection lost")  # the stream ended: the ticket fails
    cut_inbox.release()
    await asyncio.sleep(0)
    return collector, len(_chunks(evil))


def test_a_connection_cut_after_any_chunk_leaves_the_round_exact() -> None:
    expected = _bytes(_whole_mean_with_budget(400.0))
    total = asyncio.run(_cut_in_inbox(0))[1]
    for cut in range(total):  # cut == total would be a complete upload
        collector, _ = asyncio.run(_cut_in_inbox(cut))
        assert collector.reported == len(UPDATES)
        assert _bytes(collector.aggregator.result()) == expected, f"cut after {cut} chunks"


def test_a_poisoned_chunk_through_the_inbox_fails_only_that_worker() -> None:
    async def play() -> tuple[FitCollector, Ticket]:
        collector = FitCollector(1, WeightedMeanAggregator(), GLOBAL, weight_budget=400.0)
        session, ticket = _session("bad", collector, "tb")
        inbox = Inbox(
            session,
            signature=SIGNATURE,
            max_model_bytes=4096,
            chunk_limit=CHUNK,
            upload_slots=asyncio.Semaphore(1),
        )
        bad = {k: v.copy() for k, v in GLOBAL.items()}
        bad["fc"][4] = np.nan
        await inbox.handle(_result("tb", bad, 10))
        with pytest.raises(ProtocolError, match="NaN or Inf"):
            await _send_all(inbox, _chunks(bad))
        return collector, ticket

    collector, ticket = asyncio.run(play())
    assert ticket.future.done()
    assert [f.reason for f in collector.failures if "NaN or Inf" in f.reason]


# ---------------------------------------------------------------- memory


def test_memory_stays_o_model_with_n_uploads_in_flight() -> None:
    """8 uploads of a 2M-parameter model (8 MB each) in flight at once, chunks interleaved:
    the coordinator allocates the int64 aggregate (2 models), the take-back journal's memory
    budget (the rest of the journal spills to a file) and a few chunks, not the 8 models that
    staging would hold."""
    params, n_uploads, chunk = 2_000_000, 8, 1 << 20
    model: Weights = {"w": np.zeros(params, np.float32)}
    signature = signature_of(model)
    updates = [{"w": np.full(params, 0.01 * (i + 1), np.float32)} for i in range(n_uploads)]
    payloads = [[bytes(d) for d in iter_chunks(u, chunk)] for u in updates]
    model_bytes = params * 4
    tracemalloc.start()
    try:
        aggregator = WeightedMeanAggregator()
        aggregator.expect(10.0 * n_uploads)
        stream_interleaved(
            aggregator, signature, payloads, total_bytes=model_bytes, chunk_bytes=chunk
        )
        _, peak = tracemalloc.get_traced_memory()
        result = aggregator.result()
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(result["w"], 0.045, rtol=1e-6)
    # The int64 sum is 2 models; staging the 8 uploads would take 8 more.
    bound = 2 * model_bytes + DEFAULT_JOURNAL_MEMORY + 4 * chunk
    assert peak < bound, f"peak {peak / model_bytes:.2f} models, bound {bound / model_bytes:.2f}"
