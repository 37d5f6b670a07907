"""Worker authentication at the handshake: who is this stream, and may it use this name?

Two proofs, alone or together:

* a **bearer token** (``x-fedcore-token`` metadata) checked against the enrollment file's
  SHA-256 hash in constant time (:mod:`fedcore.enrollment`);
* the **mTLS certificate**: with ``--tls-client-ca`` gRPC has already verified the chain, and
  the certificate's common name is the worker's identity; when the enrollment entry pins a
  certificate (``cert_sha256``, written by ``fed-certs add-worker``), only that very
  certificate proves the name, whatever else the CA signed.

The proven identity must equal the name in the Hello, so no worker can take a name another
enrolled worker holds. Without an enrollment file and without mutual TLS there is nothing to
check (a loopback development federation, or ``--insecure``): every name is accepted.

Each joined worker's enrollment entry is remembered as it was at its handshake;
:meth:`Authenticator.still_allowed` is False once that entry is revoked, removed or changed
(new token or certificate), and the coordinator then closes the stream (see
:mod:`.revocation`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from fedcore.certs import fingerprint_of_pem
from fedcore.enrollment import TOKEN_METADATA_KEY, Enrollment, EnrollmentEntry
from fedcore.errors import AuthenticationError, ConfigError, IdentityMismatchError
from fedcore.sanitize import printable

__all__ = ["Authenticator"]

log = logging.getLogger("fedcore.server")


class Authenticator:
    """Checks each stream's proof of identity against its Hello name."""

    def __init__(self, enrollment: Enrollment | None, *, mutual_tls: bool) -> None:
        self.enrollment = enrollment
        self.mutual_tls = mutual_tls
        # Name -> its enrollment entry when it joined (what its proof was checked against).
        self._joined: dict[str, EnrollmentEntry | None] = {}

    @property
    def enabled(self) -> bool:
        return self.enrollment is not None or self.mutual_tls

    def refresh(self) -> bool:
        """Re-read the enrollment file if it changed; True if it did. Raises
        :class:`~fedcore.errors.ConfigError` when it became unreadable (the last good copy
        stays in force)."""
        if self.enrollment is None or not self.enrollment.reload():
            return False
        log.info("re-read the enrollment file %s", self.enrollment.path)
        return True

    def still_allowed(self, name: str) -> bool:
        """Whether the worker that joined as ``name`` may stay: its entry is still enrolled,
        not revoked, and unchanged since its handshake."""
        if self.enrollment is None:
            return True
        if self.enrollment.check_name(name) is not None:
            return False
        return self.enrollment.get(name) == self._joined.get(name)

    def forget(self, name: str) -> None:
        """``name``'s stream ended."""
        self._joined.pop(name, None)

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
                    f"the worker's certificate is for {printable(identity, 64)!r} but its "
                    f"hello claims {name!r}; start it with --name {printable(identity, 64)}"
                )
            if self.enrollment is not None:
                problem = self.enrollment.check_certificate(name, _fingerprint(auth_context))
                if problem is not None:
                    raise AuthenticationError(problem)
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
            self._joined[name] = self.enrollment.get(name)
        return identity


def _token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == TOKEN_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def _fingerprint(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """SHA-256 of the peer's certificate as gRPC verified it (None if there is none)."""
    pems = list(auth_context.get("x509_pem_cert") or [])
    if len(pems) != 1:
        return None
    try:
        return fingerprint_of_pem(pems[0])
    except ConfigError:
        return None
