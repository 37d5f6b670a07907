"""Simulation at scale with the deployment's own code (``fed-sim``).

The coordinator is :class:`fedcore.server.Coordinator`; every virtual worker is a
:class:`fedcore.worker.Worker` runtime with its own shard, state, optimizer and, where
configured, DP-SGD accountant and policy ledger. Many virtual workers share one host process
(one torch runtime) and reach the coordinator over the same gRPC protocol on the loopback.
Hosts run as local processes (:class:`LocalEngine`) or Ray actors (:class:`RayEngine`)::

    result = asyncio.run(simulate(config, DataSpec(num_clients=100), LocalEngine(), num_hosts=2))
"""

from __future__ import annotations

from .clients import DataSpec, HostSpec, WorkerSettings, client_name, client_shards, load_source
from .driver import SimulationError, SimulationResult, host_specs, simulate
from .engines import Engine, HostFailed, LocalEngine, RayEngine
from .host import HostReport, run_host
from .trainer import TransientTrainer

__all__ = [
    "DataSpec",
    "Engine",
    "HostFailed",
    "HostReport",
    "HostSpec",
    "LocalEngine",
    "RayEngine",
    "SimulationError",
    "SimulationResult",
    "TransientTrainer",
    "WorkerSettings",
    "client_name",
    "client_shards",
    "host_specs",
    "load_source",
    "run_host",
    "simulate",
]
