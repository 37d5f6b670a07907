"""The configured limits on who may connect, kept with the rest of the configuration.

* :func:`require_authentication_off_loopback`: a coordinator that other machines can reach
  checks identities (``--enrolled`` tokens or mutual TLS). TLS alone only encrypts: without a
  proof of identity anyone who reaches the port could join under any free name and send
  updates, so it is refused unless the operator says ``--insecure``.
* :class:`GateLimits`: how many streams may wait for their hello, and how fast one host may
  open new ones (enforced by :class:`fedcore.server.transport.admission.HandshakeGate`).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedcore.errors import ConfigError
from fedcore.tls import host_of, is_loopback

__all__ = ["GateLimits", "require_authentication_off_loopback"]


def require_authentication_off_loopback(
    listen: str, *, enrolled: bool, mutual_tls: bool, insecure: bool
) -> None:
    """Refuse to serve other machines without a proof of worker identity (``--insecure``
    overrides)."""
    if enrolled or mutual_tls or insecure or is_loopback(host_of(listen)):
        return
    raise ConfigError(
        f"refusing to serve {listen!r}, which other machines can reach, without worker "
        "authentication: anyone reaching it could join under any name. Give --enrolled "
        "(tokens from `fed-certs`) and/or --tls-client-ca (mutual TLS), listen on 127.0.0.1, "
        "or pass --insecure if the network itself admits only your workers"
    )


@dataclass(frozen=True)
class GateLimits:
    """The handshake gate's limits (``fed-server --help``: "limits against hostile workers")."""

    max_pending: int = 128
    max_pending_per_host: int = 32
    #: New streams per second one host may open on average (0: unlimited)...
    rate_per_host: float = 20.0
    #: ...and at once after a quiet period.
    burst_per_host: int = 100

    def __post_init__(self) -> None:
        if self.max_pending < 1 or self.max_pending_per_host < 1:
            raise ConfigError("--max-pending-handshakes and its per-host limit must be at least 1")
        if self.rate_per_host < 0:
            raise ConfigError("--handshake-rate cannot be negative (0 turns it off)")
        if self.burst_per_host < 1:
            raise ConfigError("--handshake-burst must be at least 1")
