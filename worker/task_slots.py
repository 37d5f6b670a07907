"""How many tasks a worker holds at once: its owner's ``[jobs] max-tasks``, enforced here.

The coordinator is told the bound in the hello and should respect it, but nothing from the
network is trusted: a task beyond the bound, or a second task of a job whose task is still
held, is refused before any of it runs. A task is held from its admission until its result
(or error) has been written, the moment the coordinator's ticket for it resolves too, so an
honest coordinator, which counts the same way, is never refused.
"""

from __future__ import annotations

from fedcore.errors import TaskRefused

__all__ = ["TaskSlots"]


class TaskSlots:
    """The tasks one session holds, by task id (their job ids as values)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a worker holds at least one task, got {limit}")
        self.limit = limit
        self._held: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._held)

    def take(self, task_id: str, job_id: str) -> None:
        """Hold ``task_id`` of ``job_id``, or raise :class:`TaskRefused` (nothing held)."""
        if task_id in self._held:
            raise TaskRefused("jobs.max-tasks", f"task {task_id[:32]!r} was already given")
        if job_id in self._held.values():
            # One task per job: a job's per-job state (its secure round, its error feedback)
            # is one at a time, and its rounds follow each other.
            raise TaskRefused(
                "jobs.max-tasks",
                f"a task of job {job_id[:32]!r} is still running here; a worker runs one "
                "task of a job at a time",
            )
        if len(self._held) >= self.limit:
            raise TaskRefused(
                "jobs.max-tasks",
                f"this worker already runs {len(self._held)} task(s), its owner's limit "
                f"([jobs] max-tasks = {self.limit}); the coordinator must wait for one to end",
            )
        self._held[task_id] = job_id

    def release(self, task_id: str) -> None:
        """The task's result or error was written (idempotent)."""
        self._held.pop(task_id, None)
