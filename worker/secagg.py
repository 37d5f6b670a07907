"""Secure aggregation of training updates on the worker: a fit task's round, run by the
worker's one secure-round client (:class:`~fedcore.secagg.participant.Participant`, which
analytics queries run too).

A fit task that carries a ``SecAggSetup`` starts a round: the keys go out at once, the key
directory and the shares addressed to this worker are answered as they arrive (the coordinator
sends the directory after the model's first chunk and before the rest, and the shares while
the model downloads and training runs in its thread). Once the directory is answered, the
whole mask (self mask and the pairwise masks of every peer it lists: it does not depend on the
update) is expanded in a thread, overlapping the download and training; when the relayed
shares show a peer dropped out meanwhile, its pair is taken out again. When training is done
the delta is only quantized onto the mask and sent as the task's result. The unmasking request
is answered once. Any failure, or a request an honest worker must refuse, abandons the round
and forgets its secrets. No flag is needed: the worker announces the capability and follows
the coordinator's setup.

With a :class:`~fedcore.secagg.identity.SiloIdentity` (``fed-worker --signing-key --roster``)
the worker runs only the signed mode: it signs its keys, refuses peers the roster does not
vouch for, and answers an unmasking request with a signature first, revealing shares only
once the others' signatures show they were asked the same.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import numpy as np
import numpy.typing as npt

from fedcore.codec import header_signature
from fedcore.errors import FedcoreError, SecAggError
from fedcore.secagg import wire
from fedcore.secagg.client import ClientRules, ClientState, SecAggClient
from fedcore.secagg.identity import SiloIdentity
from fedcore.secagg.participant import Participant
from fedcore.secagg.participation import ParticipationLog
from fedcore.secagg.quantize import COUNT_WORDS
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights

__all__ = ["SecAggRounds", "flat_delta"]

log = logging.getLogger("fedcore.worker")

Send = Callable[[pb.WorkerMessage], Awaitable[None]]


def flat_delta(updated: Weights, received: Weights, *, is_delta: bool) -> npt.NDArray[np.floating]:
    """The update as one flat vector of deltas, in the order of the received weights (float32
    for float32 models: the difference of two float32 numbers is exact enough to quantize)."""
    dtype = np.result_type(np.float32, *(a.dtype for a in received.values()))
    if dtype.kind != "f":
        dtype = np.dtype(np.float64)
    total = sum(a.size for a in received.values())
    out = np.empty(total, dtype=dtype)
    offset = 0
    for name, base in received.items():
        part = out[offset : offset + base.size]
        new = np.asarray(updated[name]).reshape(-1)
        if is_delta:
            part[...] = new
        else:
            np.subtract(new, np.asarray(base).reshape(-1), out=part, casting="unsafe")
        offset += base.size
    return out


def _input_words(header: pb.PayloadHeader) -> int | None:
    """The masked input's length for a task's weights (the delta and the count words); None
    for a header that does not parse (the gate refused such a task before its round started:
    a header it admitted matches the model, within ``--max-model-bytes``)."""
    try:
        return sum(t.num_elements for t in header_signature(header)) + COUNT_WORDS
    except (KeyError, ValueError, FedcoreError):
        return None


async def _prepare(client: SecAggClient, words: int) -> None:
    """Expand ``client``'s mask in a thread; a round abandoned meanwhile just has none."""
    try:
        await asyncio.to_thread(client.prepare_mask, words)
    except SecAggError as exc:
        log.debug("no mask prepared ahead: %s", exc)


class SecAggRounds:
    """The worker's secure rounds, at most one per job (by the task's job id: a worker idle
    after one job's masked upload may take another job's task while the first job's round
    is still unmasking), each run by a :class:`~fedcore.secagg.participant.Participant`.
    Every message names its job; a coordinator message is handled by that job's round only.
    """

    def __init__(
        self,
        send: Send,
        worker_name: str,
        *,
        identity: SiloIdentity | None = None,
        participation: ParticipationLog | None = None,
    ) -> None:
        self._send = send
        self._name = worker_name
        self._identity = identity
        self._participation = participation
        self._rounds: dict[str, Participant] = {}
        # Each round's mask being expanded ahead of the update (a strong reference: the event
        # loop keeps only weak ones to its tasks).
        self._preparing: dict[str, asyncio.Task[None]] = {}

    def _sender(self, job: str) -> Callable[[pb.SecAggWorkerMessage], Awaitable[None]]:
        async def send(message: pb.SecAggWorkerMessage) -> None:
            message.job_id = job
            await self._send(pb.WorkerMessage(secagg=message))

        return send

    async def start(self, task: pb.Task, rules: ClientRules | None = None) -> None:
        """A fit task with a setup arrived (and passed the gate): new keys, sent at once.
        ``rules``: what this worker requires of the round (default: the safe defaults)."""
        job = task.job_id
        previous = self._rounds.pop(job, None)
        if previous is not None:
            await previous.give_up("a new secure round started", tell=False)
        self._preparing.pop(job, None)
        setup = wire.setup_from_proto(task.secagg)
        client = SecAggClient(setup, rules=rules, identity=self._identity)
        words = _input_words(task.weights)

        async def on_directory() -> None:
            # Not awaited here: the stream's other messages (the model's chunks) keep flowing.
            if words is not None:
                self._preparing[job] = asyncio.create_task(_prepare(client, words))

        current = Participant(
            client,
            self._sender(job),
            label=f"round {task.round}",
            on_directory=on_directory,
            on_end=lambda revealed: self._ended(job, current, revealed),
        )
        self._rounds[job] = current
        await current.start()

    def _ended(self, job: str, current: Participant, revealed: bool) -> None:
        # An abandoned round stays current: mask() reports why it was abandoned.
        if revealed and self._rounds.get(job) is current:
            del self._rounds[job]

    async def abandon(self, task: pb.Task, reason: str) -> None:
        """Leave ``task``'s job's round (telling the coordinator), e.g. when the policy
        refuses to release this worker's update."""
        current = self._rounds.pop(task.job_id, None)
        if current is not None:
            await current.give_up(reason, tell=True)

    async def handle(self, message: pb.SecAggCoordinatorMessage) -> None:
        """One message of the coordinator's side of the protocol, to its job's round."""
        current = self._rounds.get(message.job_id)
        if current is not None:
            await current.handle(message)
        else:
            log.debug(
                "ignoring a secure-aggregation message of job %r: no round of it",
                message.job_id[:64],
            )

    async def mask(
        self, task: pb.Task, received: Weights, updated: Weights, *, is_delta: bool, examples: int
    ) -> npt.NDArray[np.unsignedinteger]:
        """Phase 3: wait for this worker's shares, then quantize and mask the delta."""
        current = self._rounds.get(task.job_id)
        if current is None or current.round_id != task.secagg.round_id:
            raise SecAggError("this secure round was abandoned before the update was ready")
        setup = current.client.setup
        # The coordinator closes phases 1 and 2 within two phase timeouts of the task.
        try:
            await asyncio.wait_for(current.settled.wait(), 2 * setup.phase_timeout + 5)
        except TimeoutError:
            await current.give_up("no shares arrived in time", tell=True)
        if current.client.state is not ClientState.READY:
            raise SecAggError(f"secure aggregation abandoned: {current.reason or 'not ready'}")
        if self._participation is not None:
            # On disk before the masked input exists, let alone leaves: a restart remembers.
            model = np.concatenate([np.asarray(a).reshape(-1) for a in received.values()])
            try:
                await asyncio.to_thread(
                    self._participation.admit,
                    setup,
                    model,
                    distributed_dp=current.client.rules.min_survivors > 0,
                )
            except SecAggError as exc:
                await current.give_up(str(exc), tell=True)
                raise
            del model
        delta = await asyncio.to_thread(flat_delta, updated, received, is_delta=is_delta)
        preparing = self._preparing.pop(task.job_id, None)
        if preparing is not None:
            await preparing  # mask() falls back to expanding the mask itself if it failed
        masked = await asyncio.to_thread(current.client.mask, delta, examples)
        if masked.clipped:
            log.warning(
                "round %d: %d of %d update coordinates exceeded the clipping range +/-%g and "
                "were clipped; raise --secagg-clip on the coordinator if this recurs",
                task.round,
                masked.clipped,
                delta.size,
                setup.fixed_point.clip,
            )
        return masked.vector
