"""Median and trimmed mean stream: uploads spooled chunk by chunk, the rule run range by range.

* the streamed result is the whole-update rule's, bit for bit (float and integer tensors,
  tensors spanning several ranges, chunks cutting elements in two);
* an upload cut after any chunk, or poisoned, leaves the result of the others;
* uploads proceed concurrently through the inbox (one upload slot);
* N uploads in flight and the rule itself hold O(N x range) plus the result, not N models.
"""

from __future__ import annotations

import asyncio
import gc
import math
import tracemalloc
import warnings

import numpy as np
import pytest
from interleaved import feed_interleaved, stream_interleaved

from fedcore.codec import iter_chunks, make_header
from fedcore.errors import PayloadError
from fedcore.server.engine.collectors import FitCollector
from fedcore.server.state.registry import SessionState, Ticket, WorkerSession
from fedcore.server.transport.inbox import Inbox
from fedcore.server.transport.upload_stream import StreamedUpload, layout_of
from fedcore.strategy import (
    BufferingAggregator,
    CoordinateMedian,
    Krum,
    MultiKrum,
    SpoolingAggregator,
    StreamingAggregator,
    TrimmedMean,
    UpdateAccess,
)
from fedcore.strategy.spool import RANGE_BYTES
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights, signature_of

RNG = np.random.default_rng(11)
# "big" spans three ranges of the rule (RANGE_BYTES / 8 elements each).
BIG = 2 * (RANGE_BYTES // 8) + 1234
GLOBAL: Weights = {
    "conv": RNG.normal(0, 0.1, (3, 5)).astype(np.float32),
    "steps": np.array([40, 7], np.int64),
    "big": RNG.normal(0, 0.1, BIG).astype(np.float32),
    "half": RNG.normal(0, 0.1, 9).astype(np.float64),
}
SIGNATURE = signature_of(GLOBAL)
CHUNK = 4099  # odd: chunks cut float32, float64 and int64 elements in two
TOTAL = sum(a.nbytes for a in GLOBAL.values())
UPDATES: list[Weights] = [
    {
        k: (v + RNG.normal(0, 0.05, v.shape) * (10 if i == 3 else 1)).astype(v.dtype)
        if v.dtype.kind == "f"
        else v + RNG.integers(-3, 4, v.shape)
        for k, v in GLOBAL.items()
    }
    for i in range(6)
]
STRATEGIES = {
    "median": CoordinateMedian(),
    "trimmed": TrimmedMean(beta=0.2),
    "trimmed0": TrimmedMean(beta=0.0),
}


def _reference(key: str, updates: list[Weights]) -> Weights:
    """The whole-update rule, written out on whole stacked tensors."""
    out: Weights = {}
    n = len(updates)
    for name, first in updates[0].items():
        stacked = np.stack([u[name] for u in updates])
        if first.dtype.kind != "f":
            stacked = stacked.astype(np.float64)
        if key == "median":
            value = np.median(stacked, axis=0)
        else:
            k = math.floor(STRATEGIES[key].beta * n)  # type: ignore[attr-defined]
            value = np.sort(stacked, axis=0)[k : n - k].mean(axis=0)
        out[name] = (
            value.astype(first.dtype)
            if first.dtype.kind == "f"
            else (np.rint(value).astype(first.dtype))
        )
    return out


def _add_all(upload: StreamedUpload, chunks: list[pb.PayloadChunk]) -> None:
    for chunk in chunks:
        upload.add(chunk)


def _chunks(update: Weights) -> list[pb.PayloadChunk]:
    return [
        pb.PayloadChunk(index=i, data=bytes(d)) for i, d in enumerate(iter_chunks(update, CHUNK))
    ]


def _upload(aggregator: StreamingAggregator, *, base: Weights | None = None) -> StreamedUpload:
    return StreamedUpload(
        SIGNATURE,
        total_bytes=TOTAL,
        chunk_bytes=CHUNK,
        stream=aggregator.open(layout_of(SIGNATURE), 10),
        base=base,
        what="test upload",
    )


def _aggregator(key: str) -> SpoolingAggregator:
    aggregator = STRATEGIES[key].start_aggregation(1, GLOBAL)
    assert isinstance(aggregator, SpoolingAggregator)
    aggregator.expect(1000.0)
    return aggregator


def _assert_same(a: Weights, b: Weights) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def test_median_and_trimmed_mean_stream_and_krum_declares_whole_updates() -> None:
    assert CoordinateMedian.update_access is UpdateAccess.STREAM
    assert TrimmedMean.update_access is UpdateAccess.STREAM
    for strategy in (Krum(), MultiKrum()):
        assert strategy.update_access is UpdateAccess.WHOLE
        assert isinstance(strategy.start_aggregation(1, GLOBAL), BufferingAggregator)


@pytest.mark.parametrize("key", sorted(STRATEGIES))
def test_streamed_interleaved_uploads_give_the_whole_update_rule_bit_for_bit(key: str) -> None:
    aggregator = _aggregator(key)
    uploads = [(_upload(aggregator), _chunks(u)) for u in UPDATES]
    for index in range(len(uploads[0][1])):  # every upload in flight at once
        for upload, chunks in uploads:
            upload.add(chunks[index])
    for upload, _ in uploads:
        assert upload.complete
        assert aggregator.commit(upload.stream, 10)
    _assert_same(aggregator.result(), _reference(key, UPDATES))


@pytest.mark.parametrize("key", sorted(STRATEGIES))
def test_whole_updates_added_give_the_same_result(key: str) -> None:
    aggregator = _aggregator(key)
    for update in UPDATES:
        aggregator.add({k: v.copy() for k, v in update.items()}, 10)
    _assert_same(aggregator.result(), _reference(key, UPDATES))


def test_delta_uploads_get_the_global_weights_added_per_piece() -> None:
    aggregator = _aggregator("median")
    for update in UPDATES:
        delta = {k: (v - GLOBAL[k]).astype(v.dtype) for k, v in update.items()}
        upload = _upload(aggregator, base=GLOBAL)
        for chunk in _chunks(delta):
            upload.add(chunk)
        assert aggregator.commit(upload.stream, 10)
    whole = [
        {k: np.add(v - GLOBAL[k], GLOBAL[k], dtype=v.dtype) for k, v in u.items()} for u in UPDATES
    ]
    _assert_same(aggregator.result(), _reference("median", whole))


def test_a_cut_after_any_chunk_leaves_the_rule_over_the_others() -> None:
    expected = _reference("median", UPDATES[:-1])
    chunks = _chunks(UPDATES[-1])
    for cut in range(len(chunks) + 1):
        aggregator = _aggregator("median")
        for update in UPDATES[:-1]:
            aggregator.add({k: v.copy() for k, v in update.items()}, 10)
        upload = _upload(aggregator)
        for chunk in chunks[:cut]:
            upload.add(chunk)
        if cut < len(chunks) or cut % 2:  # cut mid-way, or the round closed before commit
            upload.abort()
            assert not aggregator.commit(upload.stream, 10)
        _assert_same(aggregator.result(), expected)
    # Positive control: the same upload committed does change the result.
    aggregator = _aggregator("median")
    for update in UPDATES:
        aggregator.add({k: v.copy() for k, v in update.items()}, 10)
    assert aggregator.result()["big"].tobytes() != expected["big"].tobytes()


def test_an_upload_left_open_at_the_end_never_counts() -> None:
    aggregator = _aggregator("trimmed")
    for update in UPDATES[:-1]:
        aggregator.add({k: v.copy() for k, v in update.items()}, 10)
    upload = _upload(aggregator)
    for chunk in _chunks(UPDATES[-1]):
        upload.add(chunk)
    _assert_same(aggregator.result(), _reference("trimmed", UPDATES[:-1]))
    assert not aggregator.commit(upload.stream, 10)


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_a_poisoned_chunk_is_refused(poison: float) -> None:
    aggregator = _aggregator("median")
    bad = {k: v.copy() for k, v in UPDATES[0].items()}
    bad["big"][BIG - 5] = poison
    upload = _upload(aggregator)
    with pytest.raises(PayloadError, match="NaN or Inf"):
        _add_all(upload, _chunks(bad))
    upload.abort()  # what the inbox does on a refused chunk
    # Positive control: the clean update goes through the same harness.
    clean = _upload(aggregator)
    for chunk in _chunks(UPDATES[0]):
        clean.add(chunk)
    assert aggregator.commit(clean.stream, 10)
    _assert_same(aggregator.result(), _reference("median", UPDATES[:1]))


def test_an_incomplete_or_misplaced_upload_cannot_be_committed() -> None:
    aggregator = _aggregator("median")
    upload = _upload(aggregator)
    chunks = _chunks(UPDATES[0])
    for chunk in chunks[:-1]:
        upload.add(chunk)
    with pytest.raises(PayloadError, match="before all of its elements"):
        aggregator.commit(upload.stream, 10)
    stream = aggregator.open(layout_of(SIGNATURE), 10)
    with pytest.raises(PayloadError, match="does not follow"):
        stream.fold("big", 5, np.zeros(3, np.float32))
    with pytest.raises(PayloadError, match="overruns"):
        stream.fold("conv", 0, np.zeros(16, np.float32))
    assert stream.fold("conv", 0, np.zeros(15, np.float32))  # positive control
    with pytest.raises(ValueError, match="no updates"):
        aggregator.result()  # aborts (and deletes) the two open spools


def _session(name: str, collector: FitCollector, task: str) -> tuple[WorkerSession, Ticket]:
    session = WorkerSession(name, pb.Hello(name=name, num_examples=1000), "test")
    session.transition(SessionState.IDLE)
    ticket = Ticket(task, 1, pb.TASK_KIND_FIT, session, collector=collector)
    collector.tickets.append(ticket)
    session.assign(ticket)
    return session, ticket


def _result(task: str, update: Weights) -> pb.WorkerMessage:
    return pb.WorkerMessage(
        result=pb.TaskResult(
            task_id=task,
            num_examples=10,
            update=make_header(update, CHUNK),
            update_kind=pb.UPDATE_KIND_WEIGHTS,
        )
    )


async def _interleaved(streaming: bool) -> FitCollector:
    """Six uploads on six inboxes sharing ONE upload slot, their chunks interleaved."""
    budget = 6000.0 if streaming else None
    collector = FitCollector(
        1, CoordinateMedian().start_aggregation(1, GLOBAL), GLOBAL, weight_budget=budget
    )
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
        inboxes.append((inbox, _result(f"t{i}", update), _chunks(update)))
    await feed_interleaved(inboxes)
    return collector


def test_uploads_proceed_concurrently_through_the_inbox() -> None:
    collector = asyncio.run(_interleaved(streaming=True))
    assert collector.reported == len(UPDATES)
    _assert_same(collector.aggregator.result(), _reference("median", UPDATES))
    # Positive control: staged whole, the uploads wait for the one slot in turn.
    with pytest.raises(TimeoutError):
        asyncio.run(_interleaved(streaming=False))


def test_memory_is_o_n_times_range_not_n_models() -> None:
    """8 uploads of a 2M-parameter model in flight at once, then the median: the coordinator
    allocates the result (one model) and a few ranges per update, not the 8 models that
    buffering takes (shown by the same measurement of the whole-update aggregator)."""
    params, n_uploads, chunk = 2_000_000, 8, 1 << 18
    model: Weights = {"w": np.zeros(params, np.float32)}
    signature = signature_of(model)
    updates = [{"w": np.full(params, 0.01 * (i + 1), np.float32)} for i in range(n_uploads)]
    payloads = [[bytes(d) for d in iter_chunks(u, chunk)] for u in updates]
    del updates
    model_bytes = params * 4

    def measure(aggregator: StreamingAggregator | BufferingAggregator) -> tuple[int, Weights]:
        tracemalloc.start()
        try:
            if isinstance(aggregator, StreamingAggregator):
                stream_interleaved(
                    aggregator, signature, payloads, total_bytes=model_bytes, chunk_bytes=chunk
                )
            else:
                for chunks in payloads:
                    aggregator.add({"w": np.frombuffer(b"".join(chunks), np.float32).copy()}, 10)
            result = aggregator.result()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return peak, result

    peak, result = measure(_aggregator("median"))
    np.testing.assert_allclose(result["w"], 0.045, rtol=1e-6)
    # The result (1 model) plus the rule's working set: a range of each update read, stacked,
    # and copied by the median (a few x N x range), whatever the model's size.
    working = peak - model_bytes
    assert working < 3 * n_uploads * RANGE_BYTES, f"working set {working / 2**20:.2f} MiB"
    assert peak < 1.75 * model_bytes, f"peak {peak / model_bytes:.2f} models"
    control, _ = measure(BufferingAggregator(lambda us: us[0]))
    assert control > n_uploads * model_bytes, f"control {control / model_bytes:.2f} models"


def test_a_round_whose_rule_never_runs_leaves_no_file_open() -> None:
    aggregator = _aggregator("median")
    aggregator.add({k: v.copy() for k, v in UPDATES[0].items()}, 10)
    upload = _upload(aggregator)
    _add_all(upload, _chunks(UPDATES[1]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del aggregator, upload  # the round failed: result() is never called
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
