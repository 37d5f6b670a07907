"""Serve a console's ASGI app with uvicorn on the running event loop (no thread, no process).

The socket is bound before the app serves, so the port (``--console 127.0.0.1:0`` picks one)
is known at once and a busy port fails the command at start. uvicorn's own signal handling is
turned off: the process keeps its handlers (Ctrl-C stops the worker or coordinator, which
then stops the console).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from fedcore.errors import ConfigError

from .settings import ConsoleSettings

__all__ = ["RunningConsole", "serve_console"]

log = logging.getLogger("fedcore.console")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The host process owns SIGINT/SIGTERM.
        yield


def _bind(settings: ConsoleSettings) -> socket.socket:
    host = settings.host
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"--console {settings.listen}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot serve the console on {settings.listen}: {exc.strerror}"
        ) from None
    return sock


class RunningConsole:
    """A console being served; :meth:`stop` ends it."""

    def __init__(self, server: _Server, sock: socket.socket, url: str) -> None:
        self._server = server
        self._sock = sock
        self.url = url
        self.port: int = sock.getsockname()[1]
        self._task = asyncio.create_task(server.serve(sockets=[sock]))

    async def stop(self) -> None:
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, 5)
        self._sock.close()


async def serve_console(app: ASGIApp, settings: ConsoleSettings) -> RunningConsole:
    """Start serving ``app`` as ``settings`` say (TLS off loopback is checked by them)."""
    config = uvicorn.Config(
        app,
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        log_config=None,  # leave the process's logging as it is
        log_level="warning",
        access_log=False,
        lifespan="off",
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=2,
    )
    try:
        config.load()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"the console's TLS certificate or key cannot be used: {exc}") from None
    sock = _bind(settings)
    port = sock.getsockname()[1]
    host = settings.host
    shown = f"[{host}]" if ":" in host else host
    url = f"{'https' if settings.tls else 'http'}://{shown}:{port}/"
    return RunningConsole(_Server(config), sock, url)
