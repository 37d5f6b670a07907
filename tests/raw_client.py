"""A hand-driven stream to the coordinator, for tests that send what a real worker never
would (shared by the protocol, hardening, secure-aggregation and UX tests)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc

from fedcore.codec import PayloadAssembler, iter_chunks, make_header
from fedcore.protocol import JOIN_METHOD, PROTOCOL_VERSION, STREAM_END, serialize_worker_message
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights

TIMEOUT = 60


class RawClient:
    """A hand-driven stream to the coordinator, for sending what a real worker never would."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}",
            options=[
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20),
            ],
        )
        factory: Any = self.channel.stream_stream(
            JOIN_METHOD,
            request_serializer=serialize_worker_message,
            response_deserializer=pb.CoordinatorMessage.FromString,
        )
        self.call = factory()

    async def send(self, message: pb.WorkerMessage | bytes) -> None:
        await self.call.write(message)

    async def hello(self, name: str, **fields: Any) -> pb.CoordinatorMessage:
        hello = pb.Hello(name=name, protocol_version=PROTOCOL_VERSION, num_examples=10, **fields)
        await self.send(pb.WorkerMessage(hello=hello))
        return await asyncio.wait_for(self.call.read(), TIMEOUT)

    async def receive_task(self) -> tuple[pb.Task, Weights]:
        while True:
            msg = await asyncio.wait_for(self.call.read(), TIMEOUT)
            if msg.WhichOneof("body") == "task":
                break
        task = msg.task
        assembler = PayloadAssembler(task.weights, max_bytes=1 << 30, max_chunk_bytes=1 << 26)
        while not assembler.complete:
            msg = await asyncio.wait_for(self.call.read(), TIMEOUT)
            # Control messages (secure aggregation) come before or between the chunks.
            if msg.WhichOneof("body") == "chunk":
                assembler.add(msg.chunk)
        return task, assembler.weights()

    async def send_update(self, task_id: str, weights: Weights, examples: int = 10) -> None:
        header = make_header(weights, 1024)
        result = pb.TaskResult(
            task_id=task_id,
            num_examples=examples,
            update=header,
            update_kind=pb.UPDATE_KIND_WEIGHTS,
        )
        # The coordinator may end the stream at the header already: later writes then fail.
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.send(pb.WorkerMessage(result=result))
            for i, data in enumerate(iter_chunks(weights, 1024)):
                await self.send(pb.WorkerMessage(chunk=pb.PayloadChunk(index=i, data=data)))

    async def final_status(self) -> tuple[grpc.StatusCode, str]:
        """Read until the stream ends; the status the coordinator ended it with."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            while await asyncio.wait_for(self.call.read(), TIMEOUT) is not STREAM_END:
                pass
        return await self.call.code(), await self.call.details()

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close(None)
