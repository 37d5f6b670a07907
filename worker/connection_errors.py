"""Why a worker could not connect, in one actionable line.

gRPC reports every failed connection as ``UNAVAILABLE`` with its transport's details
(``Hostname Verification Check failed``, ``Socket closed``). :func:`diagnose` turns the ones
with a known cause into a sentence that names what was checked and the flag that fixes it,
and says whether retrying can help: a certificate that does not name the coordinator will
not start naming it, while a busy name or a closed socket may clear up.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from fedcore.tls import ClientTLS, host_of

__all__ = ["Diagnosis", "diagnose"]


@dataclass(frozen=True)
class Diagnosis:
    """A failed connection explained; ``permanent``: retrying the same way cannot succeed."""

    message: str
    permanent: bool


def diagnose(exc: grpc.aio.AioRpcError, *, server: str, tls: ClientTLS | None) -> Diagnosis | None:
    """The cause of ``exc`` when it is a known set-up mistake, else None."""
    details = exc.details() or ""
    if exc.code() is grpc.StatusCode.ALREADY_EXISTS:
        return Diagnosis(
            f"{details}: give each worker a unique --name (a restarted worker's old "
            "connection is dropped after the coordinator's --heartbeat-timeout, then this "
            "one joins)",
            permanent=False,
        )
    if exc.code() is not grpc.StatusCode.UNAVAILABLE:
        return None
    if tls is None:
        if "Socket closed" in details:
            return Diagnosis(
                f"the coordinator at {server} closed the connection at once; if it serves "
                "TLS (fed-server --tls-cert), give this worker --tls-ca with its CA",
                permanent=False,
            )
        return None
    checked = tls.server_name or host_of(server)
    source = "--tls-server-name" if tls.server_name else "the host of --server"
    if "Hostname Verification" in details:
        return Diagnosis(
            f"TLS: the coordinator's certificate does not name {checked!r} ({source}); pass "
            "--tls-server-name with a name its certificate holds (the --server-name given to "
            f"`fed-certs init`), or reissue the certificate for {checked}",
            permanent=True,
        )
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return Diagnosis(
            f"TLS: the coordinator's certificate is not signed by --tls-ca {tls.ca}; give "
            "the ca.pem of the `fed-certs` directory that issued the coordinator's certificate",
            permanent=True,
        )
    if "WRONG_VERSION_NUMBER" in details:
        return Diagnosis(
            f"TLS: the coordinator at {server} does not serve TLS; start it with --tls-cert "
            "and --tls-key, or drop --tls-ca on a trusted network",
            permanent=True,
        )
    if "Socket closed" in details and tls.cert is None:
        return Diagnosis(
            "TLS: the coordinator closed the connection during the handshake; if it requires "
            "mutual TLS (fed-server --tls-client-ca), give this worker its certificate with "
            "--tls-cert and --tls-key (`fed-certs add-worker` makes them)",
            permanent=False,
        )
    return None
