"""Long-term silo identities: what lets a worker tell its real peers from keys a coordinator
made up (Bonawitz et al. 2017, the active-adversary variant).

Each silo holds an Ed25519 signing key (``fed-certs`` writes ``workers/NAME.signing.pem``);
the data owners agree out of band on a *roster* (``roster.json``, which ``fed-certs`` also
writes) listing every silo's name and the SHA-256 fingerprint of its public signing key::

    {"version": 1, "silos": {"hospital-a": {"signing_sha256": "3b1c..."},
                             "hospital-b": {"signing_sha256": "9f86..."}}}

A worker started with ``--signing-key`` and ``--roster`` signs every key it publishes for a
round and checks every peer's signature against the roster before it derives a mask: the
coordinator relays keys and signatures but holds no signing key of an enrolled silo, so it
can neither invent peers nor pass one silo off as another. The roster is the worker's own
copy: a coordinator cannot add names to it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcore.errors import ConfigError, SecAggError

__all__ = [
    "ROSTER_VERSION",
    "Roster",
    "SiloIdentity",
    "fingerprint",
    "generate_signing_key",
    "load_signing_key",
    "raw_public",
    "signing_key_pem",
]

ROSTER_VERSION = 1
PUBLIC_BYTES = 32
SIGNATURE_BYTES = 64


def fingerprint(public: bytes) -> str:
    """The hex SHA-256 of a raw Ed25519 public key: what a roster lists."""
    return hashlib.sha256(public).hexdigest()


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signing_key_pem(key: Ed25519PrivateKey) -> bytes:
    """The unencrypted PKCS#8 PEM of ``key`` (kept with mode 0600, like the TLS key)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key written by ``fed-certs``."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read the signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key (write one with fed-certs)")
    return key


@dataclass(frozen=True)
class Roster:
    """The silos whose signing keys this worker accepts, by name."""

    fingerprints: Mapping[str, str]

    @classmethod
    def load(cls, path: Path) -> Roster:
        try:
            raw = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the roster {path}: {exc}") from None
        if not isinstance(raw, dict) or raw.get("version") != ROSTER_VERSION:
            raise ConfigError(f"{path} is not a version-{ROSTER_VERSION} roster")
        silos = raw.get("silos")
        if not isinstance(silos, dict):
            raise ConfigError(f"{path}: 'silos' must map names to entries")
        return cls.from_fingerprints(
            {
                str(name): entry.get("signing_sha256") if isinstance(entry, dict) else None
                for name, entry in silos.items()
            },
            str(path),
        )

    @classmethod
    def from_fingerprints(cls, silos: Mapping[str, object], where: str) -> Roster:
        """A roster of ``silos`` (name -> hex SHA-256 of its signing key), e.g. the peers a
        policy pins; ``where`` names the source in errors."""
        out: dict[str, str] = {}
        for name, digest in silos.items():
            if not (
                isinstance(digest, str)
                and len(digest) == 64
                and all(c in "0123456789abcdef" for c in digest)
            ):
                raise ConfigError(f"{where}: silo {name!r} needs a hex 'signing_sha256'")
            out[str(name)] = digest
        if len(set(out.values())) != len(out):
            # One key for two names would let one silo count twice in a group.
            raise ConfigError(f"{where}: two silos share a signing key")
        return cls(out)

    def to_json(self) -> bytes:
        silos = {n: {"signing_sha256": d} for n, d in sorted(self.fingerprints.items())}
        return (json.dumps({"version": ROSTER_VERSION, "silos": silos}, indent=2) + "\n").encode()

    def check(self, name: str, public: bytes) -> None:
        """Raise unless ``public`` is the key the roster lists for ``name``."""
        expected = self.fingerprints.get(name)
        if expected is None:
            raise SecAggError(f"silo {name!r} is not in this worker's roster")
        if len(public) != PUBLIC_BYTES or fingerprint(public) != expected:
            raise SecAggError(f"the signing key shown for silo {name!r} is not the enrolled one")


class SiloIdentity:
    """This worker's name, signing key and roster."""

    def __init__(self, name: str, key: Ed25519PrivateKey, roster: Roster) -> None:
        self.name = name
        self._key = key
        self.public = raw_public(key)
        self.roster = roster
        try:
            roster.check(name, self.public)
        except SecAggError as exc:
            raise ConfigError(f"--signing-key does not match the roster: {exc}") from None

    @classmethod
    def load(cls, name: str, key_path: Path, roster_path: Path) -> SiloIdentity:
        return cls(name, load_signing_key(key_path), Roster.load(roster_path))

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def verify(self, name: str, public: bytes, message: bytes, signature: bytes) -> None:
        """Raise :class:`SecAggError` unless ``signature`` is ``name``'s (per the roster) on
        ``message``."""
        self.roster.check(name, public)
        if len(signature) != SIGNATURE_BYTES:
            raise SecAggError(f"silo {name!r} sent no valid signature")
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        except InvalidSignature:
            raise SecAggError(f"silo {name!r}'s signature does not verify") from None
