"""The data scientist's Python API: ``fedcore.connect(...)``.

::

    import fedcore

    with fedcore.connect("coord.example.org:50051", token_file="alice.token",
                         tls_ca="ca.pem") as fed:
        for d in fed.datasets(tag="diabetes"):
            print(d.silo, d.dataset.summary())
        print(fed.mock("hospital-a"))                       # made-up rows, same schema
        answer = fed.query("mean(bmi) where age > 60", epsilon=0.5, tags=["diabetes"])
        print(answer.value, "±", answer.cells[0].std_error, answer.spent)

There is no call that returns records: the service has none to give (datasets are their
public metadata, mocks are made-up rows, queries return noisy aggregates).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from fedcore.data.metadata import DatasetMetadata
from fedcore.enrollment import TOKEN_METADATA_KEY
from fedcore.errors import ConfigError, FedcoreError, QueryRefusedError
from fedcore.jobs.client import JobHandle, JobsClient
from fedcore.scientist import TOKEN_ENV, open_channel, read_token
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.v1 import fedcore_pb2_grpc

from .answer import Answer, Cell, SiloSpend
from .query import QueryError

__all__ = ["TOKEN_ENV", "AnalyticsClient", "DatasetEntry", "answer_from_proto", "connect"]

#: Environment variable holding the data scientist's token when no token file is given.


@dataclass(frozen=True)
class DatasetEntry:
    """A silo's table, by its public description."""

    silo: str
    dataset: DatasetMetadata
    has_mock: bool


def answer_from_proto(reply: pb.QueryReply) -> Answer:
    return Answer(
        query=reply.query,
        statistic=reply.statistic,
        cells=tuple(
            Cell(c.group, c.value, c.std_error, tuple(c.values), tuple(c.std_errors), c.count)
            for c in reply.cells
        ),
        spent=tuple(
            SiloSpend(s.silo, s.epsilon, s.delta, s.budget_left, s.budget_delta)
            for s in reply.spent
        ),
        noise_multiplier=reply.noise_multiplier,
        noise_std=dict(zip(reply.noise_std_names, reply.noise_std, strict=True)),
        bins=tuple(reply.bins),
        quantiles=tuple(reply.quantiles),
        exact_test_mode=reply.exact_test_mode,
    )


class AnalyticsClient:
    """A connection to a coordinator's Analytics service (use :func:`connect`)."""

    def __init__(self, channel: grpc.Channel, token: str, *, timeout: float = 300.0) -> None:
        self._channel = channel
        self._stub = fedcore_pb2_grpc.AnalyticsStub(channel)
        self._metadata = ((TOKEN_METADATA_KEY, token),)
        self.timeout = timeout

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            details = exc.details() or code.name
            if code is grpc.StatusCode.INVALID_ARGUMENT:
                raise QueryError(details) from None
            if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                raise QueryRefusedError(details) from None
            if code is grpc.StatusCode.UNAUTHENTICATED:
                raise ConfigError(details) from None
            raise FedcoreError(f"the coordinator answered {code.name}: {details}") from None

    def datasets(self, tag: str | Sequence[str] | None = None) -> list[DatasetEntry]:
        """The connected silos' tables, optionally only those carrying ``tag`` (or all of
        several tags)."""
        tags = [tag] if isinstance(tag, str) else list(tag or ())
        reply = self._call(self._stub.Datasets, pb.DatasetsRequest(tags=tags))
        return [
            DatasetEntry(d.silo, DatasetMetadata.from_proto(d.dataset), d.has_mock)
            for d in reply.datasets
        ]

    def mock_csv(self, silo: str) -> str:
        """The mock rows silo ``silo`` attached, as CSV text."""
        reply = self._call(self._stub.Mock, pb.MockRequest(silo=silo))
        return str(reply.csv)

    def mock(self, silo: str) -> Any:
        """The mock rows silo ``silo`` attached, as a ``pyarrow.Table`` (``.to_pandas()`` if
        pandas is installed)."""
        import pyarrow.csv as pacsv

        return pacsv.read_csv(io.BytesIO(self.mock_csv(silo).encode()))

    def query(
        self,
        text: str,
        *,
        epsilon: float,
        delta: float = 0.0,
        tags: Sequence[str] | str = (),
    ) -> Answer:
        """Ask ``text`` (see :mod:`fedcore.analytics.query`) over every silo tagged ``tags``,
        spending ``epsilon`` (at ``delta``; 0: the coordinator's default) of each silo's
        budget.

        Raises:
            QueryError: the query is malformed or does not fit the datasets.
            QueryRefusedError: a silo refused it (each silo's rule and reason are given).
        """
        request = pb.QueryRequest(
            query=text,
            epsilon=epsilon,
            delta=delta,
            tags=[tags] if isinstance(tags, str) else list(tags),
        )
        return answer_from_proto(self._call(self._stub.Query, request))

    @property
    def jobs(self) -> JobsClient:
        """The standing network's Jobs service on the same connection (``fed-job``)."""
        return JobsClient(self._channel, self._metadata[0][1], timeout=self.timeout)

    def train(self, study: str, *, plan_file: Path | None = None, **settings: Any) -> JobHandle:
        """Submit a training job in ``study`` to a standing network (``fed-server --serve``);
        ``settings`` are named like fed-server's flags (``rounds=5``, ``learning_rate=0.05``,
        ``require_tags=["mnist"]``). Returns its handle: ``wait()``, ``metrics()``, ``pull()``."""
        return self.jobs.submit(study, settings, plan_file=plan_file)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AnalyticsClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def connect(
    server: str,
    *,
    token: str | None = None,
    token_file: str | Path | None = None,
    tls_ca: str | Path | None = None,
    tls_server_name: str | None = None,
    insecure: bool = False,
    timeout: float = 300.0,
) -> AnalyticsClient:
    """Connect to the coordinator at ``server`` (``HOST:PORT``) as a data scientist.

    Plaintext is refused to any other machine than this one unless ``insecure``; give
    ``tls_ca`` (the CA that signed the coordinator's certificate) instead.
    """
    secret = read_token(token, token_file)
    channel = open_channel(
        server, tls_ca=tls_ca, tls_server_name=tls_server_name, insecure=insecure
    )
    return AnalyticsClient(channel, secret, timeout=timeout)
