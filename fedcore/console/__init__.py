"""The web consoles' shared parts: sign-in and sessions, CSRF, security headers, server-rendered
SVG charts, the recent-log buffer, and serving an ASGI app on the process's own event loop.

``fed-worker --console HOST:PORT`` (the data owner's console, :mod:`fedcore.worker.console`)
and ``fed-server --console HOST:PORT`` (the network console, :mod:`fedcore.server.console`)
build their pages on :func:`~.app.console_app`; this package knows nothing of either.
Starlette, Jinja2 and uvicorn are imported only when a console is asked for.
"""

from __future__ import annotations

from .settings import ConsoleSettings, add_console_flags, console_settings_from_args

__all__ = ["ConsoleSettings", "add_console_flags", "console_settings_from_args"]
