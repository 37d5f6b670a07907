"""Enrolled workers: who may join a federation, and how each proves it.

The coordinator reads an *enrollment file* (``fed-server --enrolled FILE``), written by
``fed-certs``::

    {"version": 1,
     "workers": {"hospital-a": {"token_sha256": "9f86d0...", "cert_sha256": "3b1c...",
                                "revoked": false},
                 "hospital-b": {"token_sha256": null, "revoked": true}}}

A worker proves its name with a bearer token (sent as ``x-fedcore-token`` metadata, hashed with
SHA-256 and compared in constant time with the stored hash; the token itself is never stored
on the coordinator), with the common name of its mTLS certificate, or with both. Tokens are
256-bit random strings, so a plain SHA-256 is enough: there is nothing to brute-force.
``cert_sha256`` pins the worker's certificate: the SHA-256 of its DER encoding, so another
certificate with the same common name (re-issued, or signed by a compromised or careless CA)
does not prove the name.

Data scientists (federated analytics, docs/analytics.md) are enrolled the same way in a
file of their own (``fed-certs add-scientist``, section ``"scientists"``): they present only
their token, and :meth:`Enrollment.identify` finds who holds it.

Revoking is an edit of the file (``fed-certs revoke NAME``, or removing the entry); the
coordinator re-reads it on a timer and at every handshake, refuses the name from then on and
closes the revoked worker's open stream at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcore.atomic import write_atomically
from fedcore.errors import ConfigError

__all__ = [
    "TOKEN_METADATA_KEY",
    "Enrollment",
    "EnrollmentEntry",
    "hash_token",
    "new_token",
]

TOKEN_METADATA_KEY = "x-fedcore-token"
_DUMMY_HASH = hashlib.sha256(b"fedcore: no such worker").hexdigest()


def new_token() -> str:
    """A fresh 256-bit token, URL-safe text."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token: what the coordinator stores."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class EnrollmentEntry:
    """One enrolled worker."""

    token_sha256: str | None = None
    revoked: bool = False
    #: SHA-256 (hex) of the worker's certificate in DER; None: any certificate with its name.
    cert_sha256: str | None = None
    #: A data scientist's studies (``fed-certs add-scientist --study``): the jobs they see.
    studies: tuple[str, ...] = ()


class Enrollment:
    """The enrolled workers (or, with ``section="scientists"``, data scientists), kept in sync
    with their file (re-read when it changes)."""

    def __init__(self, path: Path, *, section: str = "workers") -> None:
        self.path = path
        self.section = section
        self._entries: dict[str, EnrollmentEntry] = {}
        self._stamp: tuple[int, int] | None = None
        self.reload()

    @classmethod
    def empty(cls, path: Path, *, section: str = "workers") -> Enrollment:
        """An enrollment for a file that does not exist yet (``fed-certs`` creates it)."""
        self = cls.__new__(cls)
        self.path, self._entries, self._stamp, self.section = path, {}, None, section
        return self

    @property
    def entries(self) -> dict[str, EnrollmentEntry]:
        return dict(self._entries)

    def get(self, name: str) -> EnrollmentEntry | None:
        """``name``'s entry, or None when it is not enrolled."""
        return self._entries.get(name)

    def reload(self) -> bool:
        """Re-read the file if it changed since the last read; True if it did."""
        try:
            st = self.path.stat()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the enrollment file {self.path}: {exc.strerror or exc}; "
                "create it with `fed-certs init`"
            ) from None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        self._entries = _parse(self.path, self.section)
        self._stamp = stamp
        return True

    def verify_token(self, name: str, token: str | None) -> str | None:
        """None when ``token`` proves ``name``; otherwise why not. Constant time in the
        token whether or not the name is enrolled."""
        entry = self._entries.get(name)
        expected = entry.token_sha256 if entry and entry.token_sha256 else _DUMMY_HASH
        given = hash_token(token) if token is not None else ""
        matches = hmac.compare_digest(expected.encode(), given.encode())
        if entry is None:
            return f"worker {name!r} is not enrolled"
        if entry.revoked:
            return f"worker {name!r} has been revoked"
        if entry.token_sha256 is None:
            return (
                f"worker {name!r} is enrolled for certificate authentication only; the "
                "coordinator needs --tls-client-ca and the worker --tls-cert/--tls-key"
            )
        if token is None:
            return f"worker {name!r} sent no token; start it with --token-file"
        if not matches:
            return f"worker {name!r} sent a wrong token"
        return None

    def identify(self, token: str) -> str | None:
        """The name of the enrolled, unrevoked holder of ``token``, or None. Every entry's
        hash is compared in constant time, whatever matches."""
        given = hash_token(token).encode()
        found = None
        for name, entry in self._entries.items():
            expected = (entry.token_sha256 or _DUMMY_HASH).encode()
            if hmac.compare_digest(expected, given) and entry.token_sha256 and not entry.revoked:
                found = name
        return found

    def check_name(self, name: str) -> str | None:
        """None when ``name`` is enrolled and not revoked; otherwise why not."""
        entry = self._entries.get(name)
        if entry is None:
            return f"worker {name!r} is not enrolled"
        if entry.revoked:
            return f"worker {name!r} has been revoked"
        return None

    def check_certificate(self, name: str, fingerprint: str | None) -> str | None:
        """None when the certificate of SHA-256 ``fingerprint`` may prove ``name`` (its entry
        pins that certificate, or pins none); otherwise why not."""
        entry = self._entries.get(name)
        pinned = entry.cert_sha256 if entry is not None else None
        if pinned is None:
            return None
        if fingerprint is None or not hmac.compare_digest(pinned, fingerprint):
            return (
                f"worker {name!r} presented a certificate other than the one enrolled for it "
                f"(SHA-256 {(fingerprint or 'none')[:16]}..., enrolled {pinned[:16]}...); "
                "use the certificate `fed-certs add-worker` issued, or enroll the new one"
            )
        return None

    def requires_token(self, name: str) -> bool:
        entry = self._entries.get(name)
        return entry is not None and entry.token_sha256 is not None

    # ------------------------------------------------------------------ editing (fed-certs)

    def set(self, name: str, entry: EnrollmentEntry) -> None:
        self._entries[name] = entry

    def save(self) -> None:
        body = {
            "version": 1,
            self.section: {
                name: {"token_sha256": e.token_sha256, "revoked": e.revoked}
                | ({"cert_sha256": e.cert_sha256} if e.cert_sha256 is not None else {})
                | ({"studies": list(e.studies)} if e.studies else {})
                for name, e in sorted(self._entries.items())
            },
        }
        write_atomically(self.path, (json.dumps(body, indent=2) + "\n").encode(), mode=0o600)
        self._stamp = None


def _parse(path: Path, section: str = "workers") -> dict[str, EnrollmentEntry]:
    try:
        body: Any = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"the enrollment file {path} is unreadable: {exc}") from None
    workers = body.get(section) if isinstance(body, dict) else None
    if body.get("version") != 1 or not isinstance(workers, dict):
        raise ConfigError(
            f"the enrollment file {path} is not a fedcore v1 enrollment; "
            "create it with `fed-certs init`"
        )
    out: dict[str, EnrollmentEntry] = {}
    for name, raw in workers.items():
        if not isinstance(raw, dict):
            raise ConfigError(f"the enrollment file {path}: entry {name!r} is not an object")
        digest, pinned = raw.get("token_sha256"), raw.get("cert_sha256")
        if not _is_digest(digest):
            raise ConfigError(f"the enrollment file {path}: {name!r} has a malformed token hash")
        if not _is_digest(pinned):
            raise ConfigError(
                f"the enrollment file {path}: {name!r} has a malformed certificate fingerprint "
                "(cert_sha256: 64 lowercase hex digits)"
            )
        studies = raw.get("studies", [])
        if not isinstance(studies, list) or not all(isinstance(s, str) for s in studies):
            raise ConfigError(f"the enrollment file {path}: {name!r} has malformed studies")
        out[str(name)] = EnrollmentEntry(
            digest, bool(raw.get("revoked", False)), pinned, tuple(studies)
        )
    return out


def _is_digest(value: Any) -> bool:
    """None, or 64 lowercase hex digits."""
    return value is None or (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )
