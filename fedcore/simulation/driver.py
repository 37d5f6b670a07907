"""Run a simulated federation: the real coordinator in this process, virtual workers on hosts.

::

    coordinator (this process, fedcore.server.Coordinator)  <-- gRPC, 127.0.0.1 -->
        host 0: client-000 .. client-499  (fedcore.worker.Worker runtimes, one event loop)
        host 1: client-500 .. client-999

The coordinator is started exactly as ``fed-server`` starts it, from a
:class:`~fedcore.server.ServerConfig`; only the way workers are started differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field, replace

from fedcore.errors import ConfigError, FedcoreError
from fedcore.server import Coordinator, FederationResult, ServerConfig
from fedcore.strategy import Strategy

from .clients import DataSpec, HostSpec, WorkerSettings
from .engines import Engine, HostFailed
from .host import HostReport, peak_rss_bytes

__all__ = ["SimulationError", "SimulationResult", "host_specs", "loopback_limits", "simulate"]

log = logging.getLogger("fedcore.simulation")


class SimulationError(FedcoreError):
    """The simulated federation could not finish (its hosts' errors are in the message)."""


@dataclass
class SimulationResult:
    """The federation's result, and what each process cost."""

    federation: FederationResult
    hosts: list[HostReport]
    coordinator_peak_rss_bytes: int
    seconds: float
    engine: str
    errors: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        """A JSON-able summary: rounds, seconds per round, peak memory of every process."""
        rows = self.federation.rounds
        return {
            "engine": self.engine,
            "rounds": len(rows),
            "clients": sum(h.clients for h in self.hosts),
            "seconds": round(self.seconds, 3),
            "seconds_per_round": [r.duration_s for r in rows],
            # Centralized (--eval-data) accuracy, else the federated evaluation's, as the
            # table shows; "evaluation" says which.
            "accuracy": [r.test_accuracy for r in rows],
            "evaluation": (
                "centralized"
                if any(r.accuracy is not None for r in rows)
                else "federated"
                if any("accuracy" in r.federated for r in rows)
                else "none"
            ),
            "coordinator_peak_rss_mb": round(self.coordinator_peak_rss_bytes / 2**20, 1),
            "host_peak_rss_mb": [round(h.peak_rss_bytes / 2**20, 1) for h in self.hosts],
            "tasks": sum(h.tasks for h in self.hosts),
            "refused": sum(h.refused for h in self.hosts),
            "errors": self.errors,
        }


def loopback_limits(config: ServerConfig, num_clients: int, num_hosts: int) -> ServerConfig:
    """``config`` with the limits that guard a deployment against one hostile host raised to
    what a simulation needs: every virtual worker connects from this machine, and a host's
    workers share one gRPC connection (so one connection carries hundreds of streams)."""
    per_host = -(-num_clients // max(1, min(num_hosts, num_clients)))
    limits = config.limits
    return replace(
        config,
        limits=replace(
            limits,
            max_workers=max(limits.max_workers, num_clients),
            max_streams_per_connection=max(limits.max_streams_per_connection, per_host + 8),
            max_pending_handshakes=max(limits.max_pending_handshakes, num_clients),
            max_pending_per_host=max(limits.max_pending_per_host, num_clients),
            handshake_rate=0.0,  # unlimited: a thousand workers join from one address at once
        ),
    )


def host_specs(
    server: str,
    data: DataSpec,
    num_hosts: int,
    *,
    workers: WorkerSettings | None = None,
    concurrency: int = 1,
    log_level: str = "WARNING",
) -> list[HostSpec]:
    """Deal clients to hosts in contiguous blocks (client order is irrelevant to the result:
    the coordinator samples by name)."""
    if num_hosts < 1:
        raise ConfigError(f"--hosts must be at least 1, got {num_hosts}")
    if concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {concurrency}")
    num_hosts = min(num_hosts, data.num_clients)
    bounds = [data.num_clients * h // num_hosts for h in range(num_hosts + 1)]
    return [
        HostSpec(
            server=server,
            data=data,
            clients=tuple(range(bounds[h], bounds[h + 1])),
            workers=workers or WorkerSettings(),
            concurrency=concurrency,
            log_level=log_level,
        )
        for h in range(num_hosts)
    ]


async def simulate(
    config: ServerConfig,
    data: DataSpec,
    engine: Engine,
    *,
    num_hosts: int = 1,
    workers: WorkerSettings | None = None,
    concurrency: int = 1,
    advertise: str = "127.0.0.1",
    log_level: str = "WARNING",
    strategy: Strategy | None = None,
) -> SimulationResult:
    """Run ``config``'s federation with ``data.num_clients`` virtual workers on ``engine``.

    The coordinator serves on ``config.listen`` (port 0 picks one); hosts connect to
    ``advertise`` at that port; ``strategy`` replaces ``config.strategy`` as it does for
    ``Coordinator(config, strategy)``. If a host fails the coordinator is stopped; if the
    coordinator fails every host is stopped: nothing outlives the call.
    """
    data.check_source()
    config = loopback_limits(config, data.num_clients, num_hosts)
    started = time.perf_counter()
    coordinator = Coordinator(config, strategy)
    serving = asyncio.create_task(coordinator.run())
    ready = asyncio.create_task(coordinator.ready.wait())
    await asyncio.wait({serving, ready}, return_when=asyncio.FIRST_COMPLETED)
    if serving.done():
        ready.cancel()
        serving.result()  # raises why it could not start
        raise SimulationError("the coordinator ended before it was ready")
    specs = host_specs(
        f"{advertise}:{coordinator.port}",
        data,
        num_hosts,
        workers=workers,
        concurrency=concurrency,
        log_level=log_level,
    )
    hosting = asyncio.create_task(engine.run(specs))
    try:
        await asyncio.wait({serving, hosting}, return_when=asyncio.FIRST_COMPLETED)
        if not serving.done():
            # Every host ended while the federation still needed them.
            coordinator.stop()
            with contextlib.suppress(FedcoreError):
                await serving
            try:
                reports = hosting.result()
            except HostFailed as exc:
                raise SimulationError(str(exc)) from None
            errors = {k: v for r in reports for k, v in r.errors.items()}
            raise SimulationError(
                "the hosts' workers ended before the federation did: "
                + ("; ".join(f"{k}: {v}" for k, v in sorted(errors.items())[:5]) or "no error")
            )
        result = serving.result()
        # The coordinator told every worker the federation is over: hosts finish now.
        try:
            reports = await asyncio.wait_for(hosting, config.limits.shutdown_grace + 120)
        except HostFailed as exc:
            raise SimulationError(str(exc)) from None
    finally:
        for task in (serving, hosting):
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
    errors = {k: v for r in reports for k, v in r.errors.items()}
    return SimulationResult(
        federation=result,
        hosts=reports,
        coordinator_peak_rss_bytes=peak_rss_bytes(),
        seconds=time.perf_counter() - started,
        engine=engine.name,
        errors=errors,
    )
