"""Worker authentication at the handshake: who is this stream, and may it use this name?

Two proofs, alone or together:

* a **bearer token** (``x-fedcore-token`` metadata) checked against the enrollment file's
  SHA-256 hash in constant time (:mod:`fedcore.enrollment`);
* the **mTLS certificate**: with ``--tls-client-ca`` gRPC has already verified the chain, and
  the certificate's common name is the worker's identity.

The proven identity must equal the name in the Hello, so no worker can take a name another
enrolled worker holds. Without an enrollment file and without mutual TLS there is nothing to
check (a loopback development federation): every name is accepted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from fedcore.enrollment import TOKEN_METADATA_KEY, Enrollment
from fedcore.errors import AuthenticationError, IdentityMismatchError

__all__ = ["Authenticator"]

log = logging.getLogger("fedcore.server")


class Authenticator:
    """Checks each stream's proof of identity against its Hello name."""

    def __init__(self, enrollment: Enrollment | None, *, mutual_tls: bool) -> None:
        self.enrollment = enrollment
        self.mutual_tls = mutual_tls

    @property
    def enabled(self) -> bool:
        return self.enrollment is not None or self.mutual_tls

    def refresh(self) -> set[str]:
        """Re-read the enrollment file if it changed; the names now revoked or unknown."""
        if self.enrollment is None or not self.enrollment.reload():
            return set()
        log.info("re-read the enrollment file %s", self.enrollment.path)
        entries = self.enrollment.entries
        return {n for n, e in entries.items() if e.revoked}

    def still_allowed(self, name: str) -> bool:
        return self.enrollment is None or self.enrollment.check_name(name) is None

    def authenticate(
        self,
        name: str,
        metadata: Iterable[tuple[str, Any]] | None,
        auth_context: Mapping[str, Iterable[bytes]],
    ) -> str | None:
        """The stream's proven identity (None when authentication is off).

        Raises :class:`AuthenticationError` (unknown, revoked, missing or wrong proof) or
        :class:`IdentityMismatchError` (proven as someone else).
        """
        if not self.enabled:
            return None
        identity: str | None = None
        if self.mutual_tls:
            common_names = list(auth_context.get("x509_common_name") or [])
            if len(common_names) != 1:
                raise AuthenticationError(
                    "the worker's TLS certificate has no common name; issue it with "
                    "`fed-certs add-worker NAME`"
                )
            identity = common_names[0].decode("utf-8", "replace")
            if identity != name:
                raise IdentityMismatchError(
                    f"the worker's certificate is for {identity!r} but its hello claims "
                    f"{name!r}; start it with --name {identity}"
                )
        if self.enrollment is not None:
            token = _token(metadata)
            # A certificate alone proves a name enrolled without a token; a token, when the
            # name has one, is required in addition to any certificate.
            if identity is not None and not self.enrollment.requires_token(name):
                problem = self.enrollment.check_name(name)
            else:
                problem = self.enrollment.verify_token(name, token)
            if problem is not None:
                raise AuthenticationError(problem)
            identity = name
        return identity


def _token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == TOKEN_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None
