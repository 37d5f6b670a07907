"""Keep gRPC core's own log lines out of fedcore's output unless the user asks for them.

gRPC's C core writes to stderr directly (``I1130 12:00:00 ... ssl_transport_security.cc``),
bypassing Python logging, and reads ``GRPC_VERBOSITY`` once, when ``grpc`` is first imported.
Even at ``ERROR`` it logs what a peer got wrong (``E1130 ... No match found for server name``)
on the side that did nothing wrong. fedcore reports every failure gRPC reports to it in its
own words, so this module, imported by ``fedcore/__init__.py`` before anything imports
``grpc``, silences the core. A ``GRPC_VERBOSITY`` the user set is left alone (``ERROR`` or
``DEBUG`` brings the lines back, with ``GRPC_TRACE`` for more).
"""

from __future__ import annotations

import os

__all__ = ["GRPC_VERBOSITY_DEFAULT"]

GRPC_VERBOSITY_DEFAULT = "NONE"

os.environ.setdefault("GRPC_VERBOSITY", GRPC_VERBOSITY_DEFAULT)
