"""Uploads streamed into an aggregator chunk by chunk and interleaved across workers, as the
coordinator's inbox delivers concurrent uploads (the streaming tests' memory measurements)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from fedcore.server.transport.inbox import Inbox
from fedcore.server.transport.upload_stream import StreamedUpload, layout_of
from fedcore.strategy import StreamingAggregator
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import ModelSignature


def stream_interleaved(
    aggregator: StreamingAggregator,
    signature: ModelSignature,
    payloads: Sequence[Sequence[bytes]],
    *,
    total_bytes: int,
    chunk_bytes: int,
    weight: int = 10,
) -> None:
    """Open one stream per payload, add chunk 0 of every upload, then chunk 1, ..., and commit
    each (asserting it was accepted)."""
    uploads = [
        StreamedUpload(
            signature,
            total_bytes=total_bytes,
            chunk_bytes=chunk_bytes,
            stream=aggregator.open(layout_of(signature), weight),
            base=None,
            what=f"upload {i}",
        )
        for i in range(len(payloads))
    ]
    for index in range(len(payloads[0])):
        for upload, chunks in zip(uploads, payloads, strict=True):
            upload.add(pb.PayloadChunk(index=index, data=chunks[index]))
    for upload in uploads:
        assert aggregator.commit(upload.stream, weight)


async def feed_interleaved(
    inboxes: Sequence[tuple[Inbox, pb.WorkerMessage, Sequence[pb.PayloadChunk]]],
) -> None:
    """Every upload's result first (so each starts before any finishes: staged uploads wait
    for a slot here), then chunk 0 of every upload, chunk 1, ..."""
    for inbox, result, _ in inboxes:
        await asyncio.wait_for(inbox.handle(result), timeout=1)
    for index in range(len(inboxes[0][2])):
        for inbox, _, chunks in inboxes:
            await asyncio.wait_for(inbox.on_chunk(chunks[index]), timeout=5)
