"""Serve the network console over a standing network (``fed-server --serve --console``)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fedcore.console.logbuffer import RecentLogs
from fedcore.console.settings import ConsoleSettings

from .console import start_network_console
from .console_jobs import StandingNetworkView
from .reporting.roster import connected_workers

if TYPE_CHECKING:
    from .network import Network

__all__ = ["start_standing_console"]


async def start_standing_console(
    settings: ConsoleSettings, network: Network
) -> Callable[[], Awaitable[None]]:
    """Serve the console over ``network``'s jobs; the coroutine function that stops it."""
    jobs = network.jobs
    if jobs is None:  # a one-shot network has no Jobs service: its console is the coordinator's
        raise ValueError("the standing network's console needs a network that serves jobs")
    logs = RecentLogs()
    fedcore_log = logging.getLogger("fedcore")
    logs.attach(fedcore_log)
    view = StandingNetworkView(
        network.store,
        jobs.scientists,
        jobs.request_stop,
        lambda: connected_workers(network.registry.sessions()),
        logs,
    )
    running = await start_network_console(settings, view, title="standing network", scientists=view)
    print(f"console on {running.url}", flush=True)

    async def stop() -> None:
        await running.stop()
        logs.detach(fedcore_log)

    return stop
