"""A job's share of the network's workers: those its settings select, judged per job.

On a standing network workers join once, whatever jobs will come; whether a worker may take a
job's tasks is decided here, per job: it carries every tag the job requires, it can do secure
aggregation when the job asks for it, and its owner has not refused the job. A worker is
*idle for a job* while it holds fewer tasks than its owner allows (``[jobs] max-tasks`` in
its hello, capped by the coordinator: :meth:`~..state.registry.WorkerSession.can_take`) and
none of this job: by default one task at a time; with a higher bound, several jobs' rounds
run on it at once, never two of one job.
"""

from __future__ import annotations

import asyncio

from fedcore.protocol import SECAGG_CAPABILITY

from ..state.registry import WorkerRegistry, WorkerSession

__all__ = ["JobWorkers"]


class JobWorkers:
    """The :class:`~..state.registry.WorkerPool` of one job over the network's registry."""

    def __init__(
        self,
        registry: WorkerRegistry,
        *,
        tags: tuple[str, ...] = (),
        secagg: bool = False,
        model: str = "",
        job_id: str = "",
    ) -> None:
        self._registry = registry
        self.job_id = job_id
        self.tags = tags
        self.secagg = secagg
        self.model = model
        #: Set when the job is stopped: waits for workers end at once (the round engine then
        #: gives up its round, and the job ends at that round boundary).
        self.stopped = asyncio.Event()
        #: Silos that refused the job (by name): never selected again for it.
        self.excluded: set[str] = set()
        #: The release policy of every silo the job could select, by name (a superset of those
        #: that trained: a pull is judged by the strictest).
        self.released: dict[str, str] = {}

    def eligible(self, session: WorkerSession) -> bool:
        """Whether the job may select ``session`` (busy or not)."""
        dataset = session.dataset
        if self.tags and (dataset is None or not dataset.has_tags(self.tags)):
            return False
        if self.secagg and SECAGG_CAPABILITY not in session.capabilities:
            return False
        if session.model_name and self.model and session.model_name != self.model:
            return False  # started for another model: its gate would refuse every task
        return session.selectable and session.name not in self.excluded

    @property
    def changes(self) -> int:
        return self._registry.changes

    def sessions(self) -> list[WorkerSession]:
        return [s for s in self._registry.sessions() if self.eligible(s)]

    def idle(self) -> list[WorkerSession]:
        """The job's workers that may take one of its tasks now."""
        idle = [
            s for s in self._registry.sessions() if s.can_take(self.job_id) and self.eligible(s)
        ]
        for session in idle:
            self.released[session.name] = session.release_model
        return idle

    async def wait_for_change(self, seen: int) -> None:
        await self._registry.wait_for_change(seen)

    async def wait_for_idle(self, count: int, timeout: float | None) -> bool:
        """Wait until at least ``count`` of the job's workers are idle; False on timeout or
        once the job is stopped."""

        async def wait() -> None:
            while len(self.idle()) < count and not self.stopped.is_set():
                changed = asyncio.ensure_future(
                    self._registry.wait_for_change(self._registry.changes)
                )
                stopped = asyncio.ensure_future(self.stopped.wait())
                try:
                    await asyncio.wait({changed, stopped}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                    stopped.cancel()

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            return False
        return len(self.idle()) >= count and not self.stopped.is_set()
