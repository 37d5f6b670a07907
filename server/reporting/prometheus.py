"""The optional Prometheus endpoint of the coordinator (``fed-server --metrics-port``).

Serves ``/metrics`` over HTTP from a private registry (so several coordinators in one process
do not collide). Exported series, all prefixed ``fedcore_``:

===================================  =========  ==============================================
``rounds_completed_total``           counter    rounds aggregated (evaluation may follow)
``rounds_planned``                   gauge      ``--rounds``
``round``                            gauge      the round in progress
``workers_connected``                gauge      workers with an open stream
``workers_reporting``                gauge      valid results received in the round so far
``bytes_sent_total``                 counter    bytes written to workers (wire size)
``bytes_received_total``             counter    bytes read from workers (wire size)
``round_duration_seconds``           histogram  training + evaluation time of each round
``round_failures_total``             counter    workers dropped from rounds
``test_accuracy`` / ``test_loss``    gauge      the last round's evaluation
``dp_epsilon``                       gauge      privacy budget spent (only once DP reports one)
===================================  =========  ==============================================
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from threading import Thread
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fedcore.errors import ConfigError

from .metrics import CoordinatorStatus, RoundMetrics
from .progress import epsilon_of

__all__ = ["PrometheusExporter"]

log = logging.getLogger("fedcore.server")

_DURATION_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, float("inf"))


class PrometheusExporter:
    """A :class:`~.sink.Sink` that serves the federation's metrics.

    Args:
        host: address to bind (the coordinator's listen host).
        port: TCP port; 0 picks a free one (see :attr:`port`).
    """

    def __init__(self, host: str, port: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds_completed = Counter("fedcore_rounds_completed", "Rounds completed", registry=r)
        self.rounds_planned = Gauge("fedcore_rounds_planned", "Rounds planned", registry=r)
        self.round = Gauge("fedcore_round", "The round in progress", registry=r)
        self.workers_connected = Gauge(
            "fedcore_workers_connected", "Workers connected now", registry=r
        )
        self.workers_reporting = Gauge(
            "fedcore_workers_reporting", "Valid results received this round", registry=r
        )
        self.bytes_sent = Counter("fedcore_bytes_sent", "Bytes sent to workers", registry=r)
        self.bytes_received = Counter(
            "fedcore_bytes_received", "Bytes received from workers", registry=r
        )
        self.round_duration = Histogram(
            "fedcore_round_duration_seconds",
            "Training plus evaluation time of each round",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.failures = Counter(
            "fedcore_round_failures", "Workers dropped from a round", registry=r
        )
        self.accuracy = Gauge("fedcore_test_accuracy", "Accuracy of the last round", registry=r)
        self.loss = Gauge("fedcore_test_loss", "Loss of the last round", registry=r)
        # Registered with the first epsilon: without DP there is no 0.0 to mistake for one.
        self.epsilon: Gauge | None = None
        self._completed = 0
        self._sent = 0
        self._received = 0
        try:
            server: Any
            thread: Thread
            server, thread = start_http_server(port, addr=host, registry=r)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve Prometheus metrics on {host}:{port}: {exc.strerror}; "
                "pick another --metrics-port (0 picks a free one)"
            ) from None
        self._server = server
        self._thread = thread
        self.port: int = int(server.server_port)
        log.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)

    def update(self, status: CoordinatorStatus) -> None:
        self.rounds_planned.set(status.rounds)
        self.round.set(status.round)
        self.workers_connected.set(status.connected)
        self.workers_reporting.set(status.reported)
        if status.rounds_completed > self._completed:
            self.rounds_completed.inc(status.rounds_completed - self._completed)
            self._completed = status.rounds_completed
        # Counters only go up: add what was transferred since the last snapshot.
        if status.bytes_sent > self._sent:
            self.bytes_sent.inc(status.bytes_sent - self._sent)
            self._sent = status.bytes_sent
        if status.bytes_received > self._received:
            self.bytes_received.inc(status.bytes_received - self._received)
            self._received = status.bytes_received

    def round_completed(self, metrics: RoundMetrics) -> None:
        self.round_duration.observe(metrics.duration_s)
        if metrics.failures:
            self.failures.inc(metrics.failures)
        accuracy, loss = metrics.test_accuracy, metrics.test_loss
        if accuracy is not None:
            self.accuracy.set(accuracy)
        if loss is not None:
            self.loss.set(loss)
        eps = epsilon_of(metrics)
        if eps is not None:
            if self.epsilon is None:
                self.epsilon = Gauge(
                    "fedcore_dp_epsilon",
                    "Differential privacy budget spent",
                    registry=self.registry,
                )
            self.epsilon.set(eps)

    def close(self, status: CoordinatorStatus, rows: Sequence[RoundMetrics]) -> None:
        self.update(status)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
