"""Revocation takes effect at once: the enrollment file is re-read on a timer (and at every
handshake), and a connected worker whose entry was revoked, removed or changed is
disconnected there and then, not at its next reconnection.

If the file becomes unreadable (a half-written edit, a typo), the last good copy stays in
force and the error is logged: a broken file must neither admit anyone new nor end the
federation.
"""

from __future__ import annotations

import asyncio
import logging

from fedcore.errors import ConfigError

from ..state.registry import WorkerRegistry
from .auth import Authenticator

__all__ = ["close_revoked", "watch_revocations"]

log = logging.getLogger("fedcore.server")


def close_revoked(authenticator: Authenticator, registry: WorkerRegistry) -> list[str]:
    """Re-read the enrollment file if it changed and close the streams of workers no longer
    allowed; return their names."""
    if authenticator.enrollment is None:
        return []
    try:
        if not authenticator.refresh():
            return []  # unchanged since the last check: nobody's standing changed
    except ConfigError as exc:
        log.error("cannot re-read the enrollment file (keeping the last good copy): %s", exc)
        return []
    closed = []
    for session in registry.sessions():
        if session.identity is not None and not authenticator.still_allowed(session.name):
            log.warning("worker %r was revoked; closing its stream", session.name)
            session.close("revoked")
            closed.append(session.name)
    return closed


async def watch_revocations(
    authenticator: Authenticator, registry: WorkerRegistry, interval: float
) -> None:
    """Run :func:`close_revoked` every ``interval`` seconds until cancelled."""
    if authenticator.enrollment is None:
        return
    while True:
        await asyncio.sleep(interval)
        close_revoked(authenticator, registry)
