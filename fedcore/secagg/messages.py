"""The messages of the four phases as plain dataclasses (the wire forms live in
:mod:`fedcore.secagg.wire`), so both state machines can be driven in memory."""

from __future__ import annotations

from dataclasses import dataclass, field

from .quantize import FixedPoint

__all__ = [
    "AdvertiseKeys",
    "ConsistencySignature",
    "EncryptedShare",
    "KeyDirectory",
    "PeerKeys",
    "RoundSetup",
    "UnmaskRequest",
    "UnmaskResponse",
]


@dataclass(frozen=True)
class RoundSetup:
    """What every participant of one secure round is told with its task."""

    round_id: str
    threshold: int
    fixed_point: FixedPoint
    weight_norm: float
    phase_timeout: float
    #: Signed mode (see :mod:`fedcore.secagg.identity`): the selected silos in index order,
    #: the job and round number the keys are bound to, and the sharing group size m.
    #: Empty ``members``: the unsigned mode (an honest-but-curious coordinator only).
    members: tuple[str, ...] = ()
    job: str = ""
    round_number: int = 0
    group_size: int = 0

    @property
    def signed(self) -> bool:
        return bool(self.members)


@dataclass(frozen=True)
class AdvertiseKeys:
    """Phase 1, worker -> coordinator: two X25519 public keys (signed mode: with the silo's
    Ed25519 key and its signature binding both to the round)."""

    cipher_public: bytes
    mask_public: bytes
    signing_public: bytes = b""
    signature: bytes = b""


@dataclass(frozen=True)
class PeerKeys:
    """A neighbour's index and public keys."""

    index: int
    cipher_public: bytes
    mask_public: bytes
    signing_public: bytes = b""
    signature: bytes = b""


@dataclass(frozen=True)
class KeyDirectory:
    """Phase 1, coordinator -> worker: its own index and its neighbours' keys."""

    index: int
    peers: dict[int, PeerKeys]


@dataclass(frozen=True)
class EncryptedShare:
    """Phase 2: the shares of ``sender``'s secrets for ``recipient``, sealed for it."""

    sender: int
    recipient: int
    ciphertext: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Phase 4, coordinator -> worker: who sent masked input, and who dropped after sharing."""

    survivors: frozenset[int]
    dropped: frozenset[int]


@dataclass(frozen=True)
class ConsistencySignature:
    """Signed mode, phase 4a: survivor ``index``'s signature on the unmasking request it was
    shown (and its signing key, checked against the roster by whoever verifies it)."""

    index: int
    signing_public: bytes
    signature: bytes


@dataclass(frozen=True)
class UnmaskResponse:
    """Phase 4, worker -> coordinator: Shamir share values (66 bytes) by owner index."""

    self_mask_shares: dict[int, bytes] = field(default_factory=dict)
    key_shares: dict[int, bytes] = field(default_factory=dict)
