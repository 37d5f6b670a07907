"""The take-back journal: pieces in memory up to a shared budget, past it in a spill file.

* an upload cut after any chunk is taken back exactly whether its journal is all in memory,
  all spilled or split between the two (with a positive control: without the take-back the
  sum differs, so the harness reaches the journal);
* memory held stays within the round's budget however many streams are open, and is given
  back when a stream ends;
* a piece its caller may change is copied; a received chunk is kept by reference;
* a spill that cannot be written refuses the piece and leaves the sum as it was;
* spill files are reused across uploads and rounds, and a reused file, which still holds its
  last user's longer content, is read only within what its new user wrote: a cut after any
  chunk is taken back exactly (with a positive control: a take-back that reads the file to
  its end breaks the sum); a write that fails part-way leaves the journal consistent; an idle
  pool keeps at most its bound, and a pool dropped without closing closes its files.
"""

from __future__ import annotations

import gc
import os
import resource

import numpy as np
import pytest

from fedcore.codec import iter_chunks
from fedcore.errors import PayloadError
from fedcore.server.transport.upload_stream import StreamedUpload, layout_of
from fedcore.strategy.fixed_point import FixedPointSum
from fedcore.strategy.journal import Journal, JournalBudget, SpillFile, SpillPool
from fedcore.strategy.streaming import UpdateStream
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights, signature_of

RNG = np.random.default_rng(11)
MODEL: Weights = {
    "a": RNG.normal(0, 0.1, 40).astype(np.float32),
    "n": np.array([3, 9], np.int64),
    "b": RNG.normal(0, 0.1, 25).astype(np.float64),
}
SIGNATURE = signature_of(MODEL)
TOTAL = sum(a.nbytes for a in MODEL.values())
CHUNK = 37  # odd: chunks cut elements in two
HONEST = [
    ({k: (v + RNG.normal(0, 0.05, v.shape)).astype(v.dtype) for k, v in MODEL.items()}, n)
    for n in (12, 5)
]
CUT = {k: v * np.asarray(7, v.dtype) for k, v in MODEL.items()}


def _sum() -> FixedPointSum:
    total = FixedPointSum(100.0)
    for name, array in MODEL.items():
        total.declare(name, array.shape, array.dtype)
    return total


def _budget(memory: int) -> JournalBudget:
    """A budget with a pool of its own, so each test sees only its own files."""
    return JournalBudget(memory, pool=SpillPool())


def _upload(total: FixedPointSum, n: int, budget: JournalBudget) -> StreamedUpload:
    return StreamedUpload(
        SIGNATURE,
        total_bytes=TOTAL,
        chunk_bytes=CHUNK,
        stream=UpdateStream(total, n, journal=budget),
        base=None,
        what="test upload",
    )


def _chunks(update: Weights) -> list[pb.PayloadChunk]:
    return [
        pb.PayloadChunk(index=i, data=bytes(d)) for i, d in enumerate(iter_chunks(update, CHUNK))
    ]


def _honest(total: FixedPointSum, budget: JournalBudget) -> None:
    for update, n in HONEST:
        upload = _upload(total, n, budget)
        for chunk in _chunks(update):
            upload.add(chunk)
        assert upload.complete
        assert upload.stream.commit()


def _expected() -> bytes:
    total = _sum()
    _honest(total, _budget(1 << 20))
    return total.digest_bytes()


@pytest.mark.parametrize("memory", [0, 3 * CHUNK, 1 << 20], ids=["spilled", "split", "memory"])
def test_a_cut_after_any_chunk_is_taken_back_exactly(memory: int) -> None:
    expected = _expected()
    chunks = _chunks(CUT)
    assert len(chunks) > 8
    for cut in range(len(chunks) + 1):
        total, budget = _sum(), _budget(memory)
        upload = _upload(total, 40, budget)
        for chunk in chunks[:cut]:
            upload.add(chunk)
        _honest(total, budget)  # others fold and commit while it is in flight
        if cut:  # positive control: the cut part is in the sum until taken back
            assert total.digest_bytes() != expected
        upload.abort()
        assert total.digest_bytes() == expected, f"cut after {cut} chunks"
        assert budget.held == 0


def test_memory_held_stays_within_the_shared_budget() -> None:
    limit = 4 * CHUNK
    total, budget = _sum(), _budget(limit)
    uploads = [_upload(total, 10, budget) for _ in range(4)]
    chunks = _chunks(CUT)
    peak = 0
    for index in range(len(chunks)):
        for upload in uploads:
            upload.add(chunks[index])
            peak = max(peak, budget.held)
    assert 0 < peak <= limit
    for upload in uploads[:2]:
        upload.stream.commit()
    for upload in uploads[2:]:
        upload.abort()
    assert budget.held == 0


def test_a_piece_its_owner_may_change_is_copied_and_a_received_one_is_not() -> None:
    total, budget = _sum(), _budget(1 << 20)
    stream = UpdateStream(total, 4, journal=budget)
    values = np.full(10, 0.5, np.float32)
    stream.fold("a", 0, values)
    assert budget.held == values.nbytes  # a copy of what was folded
    values[:] = 1000.0  # the owner reuses its buffer
    stream.abort()
    assert total.digest_bytes() == _sum().digest_bytes()
    # A read-only view of received bytes is kept as it is: charged the whole buffer once.
    received = np.full(16, 0.25, np.float32).tobytes()
    stream = UpdateStream(total, 4, journal=budget)
    stream.fold("a", 0, np.frombuffer(received, np.float32, count=8))
    # The coordinator's path: a view into the received message (fedcore.codec.RawChunk).
    view = memoryview(memoryview(received)[32:]).cast("B")
    stream.fold("a", 8, np.frombuffer(view, np.float32, count=8))
    assert budget.held == len(received)
    stream.abort()
    assert total.digest_bytes() == _sum().digest_bytes()


def test_a_spill_that_cannot_be_written_refuses_the_piece_and_leaves_the_sum(
    tmp_path: object,
) -> None:
    missing = str(tmp_path) + "/no-such-folder"
    values = np.full(10, 0.5, np.float32)
    # Positive control: the same piece folds when the spill folder exists.
    total = _sum()
    UpdateStream(total, 4, journal=JournalBudget(0, directory=str(tmp_path))).fold("a", 0, values)
    assert total.digest_bytes() != _sum().digest_bytes()
    total = _sum()
    stream = UpdateStream(total, 4, journal=JournalBudget(0, directory=missing))
    with pytest.raises(PayloadError, match="journal could not be written"):
        stream.fold("a", 0, values)
    assert total.digest_bytes() == _sum().digest_bytes()


def test_layout_of_the_test_model_has_every_dtype() -> None:
    # The harness exercises float32, int64 and float64 pieces (and elements cut in two).
    assert {str(d) for _, d in layout_of(SIGNATURE).values()} == {"float32", "int64", "float64"}


class _Lending(SpillPool):
    """A pool that remembers the files it lent, so a test can look at them."""

    def __init__(self) -> None:
        super().__init__()
        self.lent: list[SpillFile] = []

    def take(self) -> SpillFile:
        file = super().take()
        self.lent.append(file)
        return file


def _as_update(raw: bytes) -> Weights:
    """The payload bytes ``raw`` (a whole update's length) as the test model's tensors."""
    update: Weights = {}
    offset = 0
    for name, (shape, dtype) in layout_of(SIGNATURE).items():
        size = int(np.prod(shape)) * dtype.itemsize
        update[name] = np.frombuffer(raw[offset : offset + size], dtype).reshape(shape)
        offset += size
    return update


@pytest.mark.parametrize("memory", [0, 3 * CHUNK], ids=["spilled", "split"])
def test_a_reused_spill_file_replays_only_its_new_users_bytes(memory: int) -> None:
    expected = _expected()
    chunks = _chunks(CUT)
    # The previous user, an upload with the same layout and other values, wrote the whole
    # payload: a later cut leaves its bytes in the file past what the new user wrote.
    previous = _chunks({k: v * np.asarray(3, v.dtype) for k, v in MODEL.items()})
    for cut in range(len(chunks) + 1):
        pool = _Lending()
        budget = JournalBudget(memory, pool=pool)
        finished = _upload(_sum(), 40, budget)  # an earlier round's upload, on its own sum
        for chunk in previous:
            finished.add(chunk)
        assert finished.stream.commit()
        assert pool.free == 1
        total = _sum()
        upload = _upload(total, 40, budget)
        for chunk in chunks[:cut]:
            upload.add(chunk)
        _honest(total, budget)
        assert pool.reused >= 1  # an upload of this round overwrote the earlier one's file
        if memory == 0 and 0 < cut < len(chunks):
            # The cut upload spilled its first piece, so it took the idle file.
            reused = pool.lent[1]
            assert reused is pool.lent[0]
            stale = reused.size() - reused.length
            # Positive control: the old bytes are there past what this upload wrote, ...
            assert stale > 0
            with pytest.raises(ValueError, match="outside"):
                reused.read(reused.length, stale)
            # ... and a take-back that read the file to its end would subtract them too,
            # leaving the honest sum minus the tail.
            raw = os.pread(reused.fd, reused.size(), 0)
            tail = _as_update(bytes(reused.length) + raw[reused.length :])
            leaky = _sum()
            _honest(leaky, _budget(0))
            for name, values in tail.items():
                leaky.fold(name, 0, values, 40, -1)
            assert leaky.digest_bytes() != expected
        upload.abort()
        assert total.digest_bytes() == expected, f"cut after {cut} chunks"
        assert budget.held == 0
        pool.close()


def test_a_write_that_fails_part_way_leaves_the_journal_as_it_was() -> None:
    pool = _Lending()
    journal = Journal(JournalBudget(0, pool=pool))
    total = _sum()
    total.reserve(4)
    first = np.full(10, 0.5, np.float32)
    journal.append("a", 0, first)
    total.fold("a", 0, first, 4, +1)
    big = np.arange(30, dtype=np.float32) / 64
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Files may grow 40 more bytes: the next piece is written in part, then refused (Python
    # ignores SIGXFSZ, so the write fails with EFBIG).
    resource.setrlimit(resource.RLIMIT_FSIZE, (first.nbytes + 40, hard))
    try:
        with pytest.raises(OSError, match="too large"):
            journal.append("a", 10, big)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert journal.spilled_bytes == first.nbytes  # the partial bytes are not the journal's
    # Positive control: the write did fail part-way (its first 40 bytes reached the file).
    assert pool.lent[0].size() == first.nbytes + 40
    journal.append("a", 10, big[:5])  # the next write overwrites the partial bytes
    total.fold("a", 10, big[:5], 4, +1)
    assert journal.spilled_bytes == first.nbytes + 20
    for name, start, values in journal.replay():
        total.fold(name, start, values, 4, -1)
    assert total.digest_bytes() == _sum().digest_bytes()
    journal.close()
    pool.close()


def test_an_idle_pool_keeps_at_most_its_bound() -> None:
    pool = SpillPool(keep_bytes=1000, keep_files=2)
    budget = JournalBudget(0, pool=pool)
    journals = [Journal(budget) for _ in range(3)]
    for journal in journals:
        journal.append("a", 0, np.zeros(150, np.float32))  # 600 bytes each
    assert pool.free == 0  # files lent out are not bounded: each journal needs its bytes
    for journal in journals:
        journal.close()
    # The first kept whole (600), the second cut to what fits (400), the third closed.
    assert (pool.free, pool.kept_bytes) == (2, 1000)
    first, second = pool.take(), pool.take()
    assert sorted([first.size(), second.size()]) == [400, 600]
    assert pool.reused == 2
    for file in (first, second):
        pool.give(file)
    pool.close()
    assert (pool.free, pool.kept_bytes) == (0, 0)


def test_a_dropped_pool_closes_its_files() -> None:
    pool = SpillPool()
    file = pool.take()
    fd = file.fd
    pool.give(file)
    del file
    os.fstat(fd)  # positive control: the idle file the pool keeps is open
    del pool
    gc.collect()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)
