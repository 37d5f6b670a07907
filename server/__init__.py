"""fedcore's coordinator (``fedcore.server``): orchestrates rounds, never trains.

See ``docs/architecture.md`` for the module map: ``transport/`` (gRPC, inbox, auth),
``engine/`` (round context, synchronous and asynchronous engines, collectors), ``reporting/``
(sinks, displays, roster) and ``state/`` (registry, checkpoints, configuration).
"""

from __future__ import annotations

from .coordinator import Coordinator, FederationResult
from .reporting.roster import ConnectedWorker
from .state.config import ServerConfig

__all__ = ["ConnectedWorker", "Coordinator", "FederationResult", "ServerConfig"]
