"""The coordinator's ``--listen`` address: parsed strictly, bound by one process only.

gRPC reads a bare host as ``HOST:443`` and turns ``SO_REUSEPORT`` on by default, so a second
coordinator on a busy port starts "successfully" and the kernel splits the workers between
the two. Here the gRPC server is created with :data:`EXCLUSIVE_BIND`, and a bind failure
says why and what to do (:func:`~..state.config.split_listen` makes an address name its port).
"""

from __future__ import annotations

import errno
import socket
from typing import Final

from fedcore.errors import ConfigError

from ..state.config import split_listen

__all__ = ["EXCLUSIVE_BIND", "bind_failure"]

#: gRPC server option: never share a listening port with another process (or server).
EXCLUSIVE_BIND: Final = ("grpc.so_reuseport", 0)


def bind_failure(listen: str, detail: str) -> ConfigError:
    """The error for a port gRPC could not bind, with the reason found by binding it here."""
    host, port = split_listen(listen)
    reason = detail
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return ConfigError(
                f"cannot listen on {listen}: the port is already in use (another fed-server "
                "may be running there); stop it, or pick another port (port 0 picks a free one)"
            )
        reason = exc.strerror or str(exc)
    return ConfigError(f"cannot listen on {listen}: {reason}")
