"""Keep gRPC core's own log lines out of fedcore's output unless the user asks for them.

gRPC's C core writes to stderr directly (``I1130 12:00:00 ... ssl_transport_security.cc``),
bypassing Python logging, and reads ``GRPC_VERBOSITY`` once, when ``grpc`` is first imported.
fedcore reports every failure gRPC reports to it in its own words, so this module, imported by
``fedcore/__init__.py`` before anything imports ``grpc``, lowers the core to errors only. A
``GRPC_VERBOSITY`` (or ``GRPC_TRACE``) the user set is left alone.
"""

from __future__ import annotations

import os

__all__ = ["GRPC_VERBOSITY_DEFAULT"]

GRPC_VERBOSITY_DEFAULT = "ERROR"

os.environ.setdefault("GRPC_VERBOSITY", GRPC_VERBOSITY_DEFAULT)
