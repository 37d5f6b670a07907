"""Jobs on a standing network, from Python: submit, follow, stop, pull.

::

    import fedcore

    with fedcore.connect("coord.example.org:50051", token_file="alice.token",
                         tls_ca="ca.pem") as fed:
        job = fed.train(study="cardio", rounds=5, model="mnist-cnn", require_tags=["mnist"])
        for row in job.metrics():         # each round's metrics, as the rounds complete
            print(row["round"], row["train"])
        job.wait()
        weights, rows = job.pull()        # only when every silo's release policy allows

Settings are named like ``fed-server``'s flags (``learning_rate``, ``min_workers``, ...).
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fedcore.enrollment import TOKEN_METADATA_KEY
from fedcore.errors import ConfigError, FedcoreError
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.v1 import fedcore_pb2_grpc

__all__ = ["FINAL_STATES", "JobError", "JobHandle", "JobStatus", "JobsClient"]

#: States of a job that is over.
FINAL_STATES = frozenset({"completed", "stopped", "failed", "denied"})


class JobError(FedcoreError):
    """The network refused a job request (no such job in your studies, not allowed...)."""


@dataclass(frozen=True)
class JobStatus:
    """A job as the network reports it."""

    job_id: str
    study: str
    scientist: str
    kind: str
    state: str
    message: str
    rounds_done: int
    rounds: int
    created: float
    settings: dict[str, Any]
    result: dict[str, Any]
    #: Bytes of this job's messages on the workers' streams (its own only).
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @classmethod
    def from_proto(cls, info: pb.JobInfo) -> JobStatus:
        return cls(
            info.job_id,
            info.study,
            info.scientist,
            info.kind,
            info.state,
            info.message,
            info.rounds_done,
            info.rounds,
            info.created,
            json.loads(info.settings_json or "{}"),
            json.loads(info.result_json or "{}"),
            info.bytes_sent,
            info.bytes_received,
        )


class JobsClient:
    """The Jobs service over ``channel``, as the holder of ``token``."""

    def __init__(self, channel: grpc.Channel, token: str, *, timeout: float = 60.0) -> None:
        self._stub = fedcore_pb2_grpc.JobsStub(channel)
        self._metadata = ((TOKEN_METADATA_KEY, token),)
        self.timeout = timeout

    def _call(self, method: Any, request: Any, *, stream: bool = False) -> Any:
        try:
            if stream:
                return method(request, metadata=self._metadata)
            return method(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def submit(
        self,
        study: str,
        settings: dict[str, Any],
        *,
        kind: str = "train",
        plan_file: Path | None = None,
    ) -> JobHandle:
        """Queue a job in ``study`` (``kind`` "train" or "query")."""
        request = pb.JobSubmit(study=study, kind=kind, settings_json=json.dumps(settings))
        if plan_file is not None:
            try:
                request.plan_file = plan_file.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read the plan file {plan_file}: {exc.strerror}"
                ) from None
        info = self._call(self._stub.Submit, request)
        return JobHandle(self, info.job_id)

    def list(self) -> builtins.list[JobStatus]:
        """Every job of your studies, oldest first."""
        reply = self._call(self._stub.List, pb.JobListRequest())
        return [JobStatus.from_proto(info) for info in reply.jobs]

    def status(self, job_id: str) -> JobStatus:
        return JobStatus.from_proto(self._call(self._stub.Status, pb.JobRef(job_id=job_id)))

    def stop(self, job_id: str) -> JobStatus:
        """Stop a job (a running one at its next round boundary)."""
        return JobStatus.from_proto(self._call(self._stub.Stop, pb.JobRef(job_id=job_id)))

    def logs(
        self, job_id: str, *, follow: bool = False, after: int = 0, timeout: float | None = None
    ) -> Iterator[pb.JobEvent]:
        """The job's log lines; with ``follow``, new ones as they come until the job ends."""
        request = pb.JobLogsRequest(job_id=job_id, follow=follow, after=after)
        try:
            yield from self._stub.Logs(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def pull(self, job_id: str) -> tuple[bytes, builtins.list[dict[str, Any]]]:
        """The final model (safetensors bytes) and every round's metrics rows."""
        data = bytearray()
        rows: builtins.list[dict[str, Any]] = []
        try:
            for chunk in self._call(self._stub.Pull, pb.JobRef(job_id=job_id), stream=True):
                if chunk.metrics_json:
                    rows = json.loads(chunk.metrics_json)
                data += chunk.data
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return bytes(data), rows


class JobHandle:
    """One submitted job: :meth:`status`, :meth:`metrics`, :meth:`wait`, :meth:`stop`,
    :meth:`pull`."""

    def __init__(self, client: JobsClient, job_id: str) -> None:
        self.client = client
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"JobHandle({self.job_id!r})"

    def status(self) -> JobStatus:
        return self.client.status(self.job_id)

    def metrics(self) -> Iterator[dict[str, Any]]:
        """Each completed round's metrics row, as it completes, until the job ends."""
        for event in self.client.logs(self.job_id, follow=True):
            if event.metrics_json:
                yield json.loads(event.metrics_json)

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Block until the job ends (its followed log stream closes); its final status. A
        coordinator restarting meanwhile is waited for (its jobs resume).

        Raises:
            TimeoutError: still running after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        after = 0
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                for event in self.client.logs(self.job_id, follow=True, after=after, timeout=left):
                    after = event.seq
                return self.status()
            except _Unavailable:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"job {self.job_id} did not end within {timeout} s"
                    ) from None
                time.sleep(0.5)  # reconnect backoff: the coordinator is restarting
            except _Deadline:
                raise TimeoutError(f"job {self.job_id} did not end within {timeout} s") from None

    def stop(self) -> JobStatus:
        return self.client.stop(self.job_id)

    def pull(self, path: Path | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The final model as numpy arrays by name (written to ``path`` too, when given) and
        every round's metrics rows."""
        from safetensors.numpy import load

        data, rows = self.client.pull(self.job_id)
        if path is not None:
            path.write_bytes(data)
        return dict(load(data)), rows


class _Unavailable(FedcoreError):
    """The coordinator cannot be reached (it may be restarting)."""


class _Deadline(FedcoreError):
    """A call ran out of time."""


def _error(exc: grpc.RpcError) -> FedcoreError:
    code = exc.code()
    details = exc.details() or code.name
    if code is grpc.StatusCode.UNAVAILABLE:
        return _Unavailable(f"the coordinator is unreachable: {details}")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return _Deadline(details)
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return ConfigError(details)
    if code in (
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    ):
        return JobError(details)
    return FedcoreError(f"the coordinator answered {code.name}: {details}")
