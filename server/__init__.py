"""fedcore's coordinator (``fedcore.server``): orchestrates rounds, never trains."""

from __future__ import annotations

from .config import ServerConfig
from .coordinator import Coordinator, FederationResult
from .roster import ConnectedWorker

__all__ = ["ConnectedWorker", "Coordinator", "FederationResult", "ServerConfig"]
