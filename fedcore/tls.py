"""Transport security both sides share: TLS credentials from PEM files, and the loopback rule.

The coordinator serves TLS with ``ServerTLS`` (``fed-server --tls-cert --tls-key``), mutual TLS
when it also names the CA that signs worker certificates (``--tls-client-ca``): a worker then
must present a certificate from that CA, and its subject common name becomes its identity.
A worker trusts the coordinator through ``ClientTLS`` (``fed-worker --tls-ca``), and presents
its own certificate with ``--tls-cert --tls-key``.

Plaintext is for one machine only: :func:`require_tls_or_loopback` refuses a non-loopback
address without TLS unless the user says ``--insecure``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedcore.errors import ConfigError

__all__ = [
    "ClientTLS",
    "ServerTLS",
    "host_of",
    "is_loopback",
    "read_pem",
    "require_tls_or_loopback",
]

_LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


def read_pem(path: Path, what: str) -> bytes:
    """The bytes of a PEM file, or a :class:`ConfigError` that names the flag to fix."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"the {what} {path} is not a PEM file; create one with `fed-certs init`")
    return data


@dataclass(frozen=True)
class ServerTLS:
    """The coordinator's certificate and key; ``client_ca`` turns on mutual TLS."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials; with ``client_ca``, workers must present a certificate."""
        cert = read_pem(self.cert, "server certificate (--tls-cert)")
        key = read_pem(self.key, "server key (--tls-key)")
        ca = read_pem(self.client_ca, "client CA (--tls-client-ca)") if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )


@dataclass(frozen=True)
class ClientTLS:
    """What a worker trusts (``ca``), what it presents (``cert``/``key``, for mutual TLS), and
    optionally the name expected in the coordinator's certificate."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("--tls-cert and --tls-key go together: give both or neither")

    def credentials(self) -> grpc.ChannelCredentials:
        ca = read_pem(self.ca, "CA certificate (--tls-ca)")
        cert = read_pem(self.cert, "worker certificate (--tls-cert)") if self.cert else None
        key = read_pem(self.key, "worker key (--tls-key)") if self.key else None
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    def channel_options(self) -> list[tuple[str, str]]:
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []


def host_of(address: str) -> str:
    """The host part of ``HOST:PORT`` (``[v6]:PORT`` too)."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def is_loopback(host: str) -> bool:
    """True for addresses that never leave this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_tls_or_loopback(address: str, *, tls: bool, insecure: bool, role: str) -> None:
    """Refuse plaintext to or from another machine unless ``--insecure`` was given."""
    if tls or insecure or is_loopback(host_of(address)):
        return
    if role == "server":
        raise ConfigError(
            f"refusing to serve plaintext on {address!r}, which other machines can reach: "
            "give --tls-cert and --tls-key (create them with `fed-certs init`), listen on "
            "127.0.0.1, or pass --insecure if the network is otherwise protected"
        )
    raise ConfigError(
        f"refusing to connect to {address!r} without TLS: give --tls-ca (the CA that signed "
        "the coordinator's certificate), or pass --insecure if the network is otherwise "
        "protected"
    )
