"""What a round engine works with: the round context.

The coordinator builds one :class:`RoundContext` per federation and hands it to an engine
(:class:`~.sync.SyncEngine` or :class:`~.fedbuff.FedBuffEngine`). It holds the global model,
which changes only through :meth:`RoundContext.apply`, the strategy, the registry of workers,
the traffic counters, the round in progress with its collector, and the report pipeline
(whose ``end_requested`` says the strategy asked to stop). Engines use nothing else of the
coordinator, and the coordinator reads the progress of a round from here.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from fedcore.compression import EXTRA_KEY, scheme_code
from fedcore.errors import ConfigError
from fedcore.strategy import Failure, FitInstruction, FitResult, Strategy, WorkerInfo
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights

from ..state.config import ServerConfig
from ..state.registry import Collector, Ticket, WorkerPool, WorkerSession
from ..transport.inbox import SecAggRoute
from ..transport.payloads import FrozenPayload, WeightsPayload
from ..transport.service import CoordinatorService
from ..transport.traffic import Traffic
from .collectors import RoundCollector
from .reports import ReportPipeline

__all__ = ["AHEAD_OF_DIRECTORY", "PayloadPart", "RoundContext"]


#: Chunks of a secure round's model sent with its task, before the worker's key directory.
AHEAD_OF_DIRECTORY = 1


@dataclass(frozen=True)
class PayloadPart:
    """Chunks ``start`` to ``stop`` (excluded) of ``payload``, as a chunk stream."""

    payload: WeightsPayload
    start: int
    stop: int

    def messages(self) -> Iterator[bytes]:
        for index in range(self.start, self.stop):
            yield self.payload.message(index)


class RoundContext:
    """The state rounds share: global model, strategy, workers, counters, round, reports."""

    def __init__(
        self,
        config: ServerConfig,
        strategy: Strategy,
        weights: Weights,
        service: CoordinatorService,
        reports: ReportPipeline,
        *,
        frozen: Weights | None = None,
        model_order: Sequence[str] = (),
        workers: WorkerPool | None = None,
        job_id: str = "",
        scientist: str = "",
        study: str = "",
    ) -> None:
        self.config = config
        self.strategy = strategy
        #: Whom rounds select from: the registry, or on a standing network the job's workers.
        self.registry: WorkerPool = workers if workers is not None else service.registry
        #: The job every task carries (empty: a one-shot federation).
        self.job_id = job_id
        #: Who asked for the job and in which study: every task names them to the data
        #: owners (those approving every job see them in their request queue).
        self.scientist = scientist
        self.study = study
        self.reports = reports
        self._service = service
        self._weights = weights
        # Frozen parameters travel once per worker (fedcore.frozen); rounds see only the rest.
        self._frozen: FrozenPayload | None = (
            FrozenPayload(frozen, config.limits.chunk_bytes) if frozen else None
        )
        self._model_order = tuple(model_order)
        #: The round (or, asynchronously, the global update) in progress; 0 before round 1.
        self.round = 0
        #: The collector of the round in progress (for progress displays).
        self.collector: RoundCollector | None = None
        #: The last round (or global update) whose model exists; its report may be pending.
        self.rounds_completed = 0
        #: Told who the round is waiting on for their data owner's approval (the workers'
        #: names, of how many asked), and told ``[]`` once it waits no more: a standing
        #: network's job shows it as its state.
        self.on_awaiting: Callable[[list[str], int], None] | None = None

    def awaiting(self, names: list[str], issued: int) -> None:
        """Report the workers the round waits on for approval (``[]``: none any more)."""
        if self.on_awaiting is not None:
            self.on_awaiting(names, issued)

    @property
    def weights(self) -> Weights:
        """The global model (replaced, never modified in place)."""
        return self._weights

    @property
    def counters(self) -> Traffic:
        """Bytes sent and received so far: the job's own on a standing network (open while
        it runs: a query meanwhile counts in its own job), else all streams'."""
        if self.job_id:
            return self._service.counters.open(self.job_id)
        return self._service.counters

    @property
    def end_requested(self) -> bool:
        """Whether the strategy's ``on_round_end`` asked to end the federation."""
        return self.reports.end_requested

    def apply(
        self,
        round_number: int,
        aggregate: Weights,
        results: Sequence[FitResult],
        failures: Sequence[Failure],
    ) -> Weights:
        """Make the strategy's next global model from a round's aggregate: the one place the
        global model changes."""
        self._weights = self.strategy.aggregate_fit(
            round_number, self._weights, aggregate, results, failures
        )
        self.rounds_completed = round_number
        return self._weights

    def model_weights(self, trainable: Weights) -> Weights:
        """The whole model, in its own order: ``trainable`` (what rounds see) plus the frozen
        parameters. No copies."""
        if self._frozen is None:
            return trainable
        merged = {**self._frozen.weights, **trainable}
        return {name: merged[name] for name in self._model_order}

    def route_secagg(self, handler: SecAggRoute | None) -> None:
        """Send this job's secure-aggregation messages to ``handler`` (None: drop them)."""
        self._service.route_secagg(self.job_id, handler)

    def payload(self) -> WeightsPayload:
        """The global model as a chunk stream to send after a Task."""
        return WeightsPayload(self._weights, self.config.limits.chunk_bytes)

    def select(
        self, chosen: Sequence[WorkerInfo], idle: Mapping[str, WorkerSession]
    ) -> list[WorkerSession]:
        """The sessions of the workers a strategy ``chosen`` among ``idle``."""
        selected: list[WorkerSession] = []
        for worker in chosen:
            session = idle.get(worker.worker_id)
            if session is None:
                raise ConfigError(f"strategy selected unknown or busy worker {worker.name!r}")
            selected.append(session)
        return selected

    def fit_task(
        self,
        round_number: int,
        instruction: FitInstruction,
        payload: WeightsPayload,
        secagg: pb.SecAggSetup | None = None,
    ) -> pb.Task:
        """The training plan of one worker."""
        train = instruction.config.to_proto()
        if self.config.compression != "none":
            train.extra[EXTRA_KEY] = scheme_code(self.config.compression)
        return pb.Task(
            round=round_number,
            kind=pb.TASK_KIND_FIT,
            model=self.config.model.to_proto(),
            train=train,
            weights=payload.header,
            secagg=secagg,
            plan=self.config.plan,  # a model shipped as a program (server/plans.py)
            job_id=self.job_id,
            scientist=self.scientist,
            study=self.study,
        )

    def evaluate_task(self, round_number: int, payload: WeightsPayload) -> pb.Task:
        """The federated evaluation plan of one worker."""
        return pb.Task(
            round=round_number,
            kind=pb.TASK_KIND_EVALUATE,
            model=self.config.model.to_proto(),
            weights=payload.header,
            plan=self.config.plan,
            job_id=self.job_id,
            scientist=self.scientist,
            study=self.study,
        )

    def issue(
        self,
        session: WorkerSession,
        collector: Collector,
        task: pb.Task,
        payload: WeightsPayload,
    ) -> Ticket:
        """Give ``task`` to ``session``: a ticket for ``collector``, then the plan and its
        weights on the worker's stream (a secure round's weights after the first chunk behind
        the ticket's gate, which its collector opens; a resolved ticket opens it too)."""
        task.task_id = uuid.uuid4().hex
        ticket = Ticket(
            task.task_id, task.round, task.kind, session, job_id=task.job_id, collector=collector
        )
        session.assign(ticket)
        frozen = self._frozen
        attach = frozen is not None and frozen.digest not in session.frozen_held
        if frozen is not None:
            task.frozen.CopyFrom(frozen.plan(attached=attach))
        session.send(pb.CoordinatorMessage(task=task))
        if frozen is not None and attach:
            session.send(frozen.payload)
            # Sent once per session: a worker that loses them reconnects and says so in its hello.
            session.frozen_held.add(frozen.digest)
        if not task.HasField("secagg"):
            session.send(payload)
            return ticket
        # A secure round's model after its first chunk waits for the worker's key directory
        # (the round opens the gate): model bytes already in the link would hold the directory
        # back. The first chunk keeps the link busy during the keys' round trip.
        head = min(AHEAD_OF_DIRECTORY, payload.chunks)
        session.send(PayloadPart(payload, 0, head))
        ticket.gate = gate = session.hold()
        ticket.future.add_done_callback(lambda _: gate.open())
        session.send(PayloadPart(payload, head, payload.chunks))
        return ticket
