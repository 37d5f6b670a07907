"""The key material of secure aggregation, all from the ``cryptography`` package.

* X25519 key pairs: each worker has one to encrypt the shares it receives (``cipher``) and one
  to agree pairwise mask seeds (``mask``).
* :func:`agree`: X25519 followed by HKDF-SHA256, bound to the round and to the key's purpose;
  gives a full 256-bit key.
* :func:`seal` / :func:`open_sealed`: ChaCha20-Poly1305 with a random 96-bit nonce, so a share
  can be neither read nor altered by the coordinator that relays it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcore.errors import SecAggError

__all__ = [
    "KEY_BYTES",
    "KeyPair",
    "agree",
    "open_sealed",
    "public_from_private",
    "seal",
]

KEY_BYTES = 32
_NONCE_BYTES = 12
_LABEL = b"fedcore-secagg-v1/"


@dataclass(frozen=True, slots=True)
class KeyPair:
    """An X25519 key pair as raw 32-byte strings."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        key = X25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return cls(private, public_from_private(private))


def public_from_private(private: bytes) -> bytes:
    """The raw public key of a raw X25519 private key."""
    if len(private) != KEY_BYTES:
        raise SecAggError(f"an X25519 private key has {KEY_BYTES} bytes, got {len(private)}")
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def agree(private: bytes, peer_public: bytes, *, purpose: str, round_id: str) -> bytes:
    """A 256-bit key shared with the owner of ``peer_public``, for one purpose and round."""
    if len(peer_public) != KEY_BYTES:
        raise SecAggError(f"an X25519 public key has {KEY_BYTES} bytes, got {len(peer_public)}")
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as exc:  # a low-order point gives the all-zero secret
        raise SecAggError(f"a peer's public key is invalid: {exc}") from None
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=None,
        info=_LABEL + purpose.encode() + b"/" + round_id.encode(),
    ).derive(shared)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext`` (nonce prepended)."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """Decrypt what :func:`seal` made; raises :class:`SecAggError` if it was altered."""
    if len(sealed) < _NONCE_BYTES + 16:
        raise SecAggError("an encrypted share is too short")
    try:
        return ChaCha20Poly1305(key).decrypt(
            sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], associated
        )
    except InvalidTag:
        raise SecAggError(
            "an encrypted share failed authentication: it was altered or misrouted"
        ) from None
