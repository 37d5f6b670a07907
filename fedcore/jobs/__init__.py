"""A data scientist's side of a standing network: jobs (``fed-job``, ``fedcore.connect``)."""

from .client import JobError, JobHandle, JobsClient, JobStatus

__all__ = ["JobError", "JobHandle", "JobStatus", "JobsClient"]
