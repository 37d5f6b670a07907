"""Conversions between the phase dataclasses and the protobuf messages of fedcore v1."""

from __future__ import annotations

from collections.abc import Iterable

from fedcore.errors import ProtocolError
from fedcore.v1 import fedcore_pb2 as pb

from .messages import (
    AdvertiseKeys,
    ConsistencySignature,
    EncryptedShare,
    KeyDirectory,
    PeerKeys,
    RoundSetup,
    UnmaskRequest,
    UnmaskResponse,
)
from .quantize import FixedPoint

__all__ = [
    "MASKED_TENSOR",
    "consistency_from_proto",
    "consistency_to_proto",
    "directory_from_proto",
    "directory_to_proto",
    "keys_from_proto",
    "keys_to_proto",
    "request_from_proto",
    "request_to_proto",
    "response_from_proto",
    "response_to_proto",
    "setup_from_proto",
    "setup_to_proto",
    "shares_from_proto",
    "shares_to_proto",
    "signatures_from_proto",
    "signatures_to_proto",
]

_MAX_SHARE_CIPHERTEXT = 512
#: The name of the one tensor a masked update carries.
MASKED_TENSOR = "secagg.masked"


def setup_to_proto(setup: RoundSetup) -> pb.SecAggSetup:
    fp = setup.fixed_point
    return pb.SecAggSetup(
        round_id=setup.round_id,
        threshold=setup.threshold,
        quant_bits=fp.bits,
        ring_bits=fp.ring_bits,
        clip=fp.clip,
        weight_norm=setup.weight_norm,
        phase_timeout_s=setup.phase_timeout,
        members=setup.members,
        job=setup.job,
        round_number=setup.round_number,
        group_size=setup.group_size,
    )


def setup_from_proto(msg: pb.SecAggSetup) -> RoundSetup:
    try:
        fp = FixedPoint(msg.quant_bits, msg.clip, msg.ring_bits)
    except Exception as exc:
        raise ProtocolError(f"invalid secure-aggregation setup: {exc}") from None
    if msg.threshold < 2 or not msg.weight_norm >= 1 or not msg.round_id:
        raise ProtocolError("invalid secure-aggregation setup: threshold, weight norm or round id")
    return RoundSetup(
        msg.round_id,
        msg.threshold,
        fp,
        msg.weight_norm,
        msg.phase_timeout_s,
        members=tuple(msg.members),
        job=msg.job,
        round_number=msg.round_number,
        group_size=msg.group_size,
    )


def keys_to_proto(round_id: str, keys: AdvertiseKeys) -> pb.SecAggKeys:
    return pb.SecAggKeys(
        round_id=round_id,
        cipher_public_key=keys.cipher_public,
        mask_public_key=keys.mask_public,
        signing_public_key=keys.signing_public,
        signature=keys.signature,
    )


def keys_from_proto(msg: pb.SecAggKeys) -> AdvertiseKeys:
    return AdvertiseKeys(
        bytes(msg.cipher_public_key),
        bytes(msg.mask_public_key),
        bytes(msg.signing_public_key),
        bytes(msg.signature),
    )


def directory_to_proto(round_id: str, directory: KeyDirectory) -> pb.SecAggPeers:
    return pb.SecAggPeers(
        round_id=round_id,
        index=directory.index,
        peers=[
            pb.SecAggPeer(
                index=p.index,
                cipher_public_key=p.cipher_public,
                mask_public_key=p.mask_public,
                signing_public_key=p.signing_public,
                signature=p.signature,
            )
            for p in directory.peers.values()
        ],
    )


def directory_from_proto(msg: pb.SecAggPeers) -> KeyDirectory:
    peers = {
        p.index: PeerKeys(
            p.index,
            bytes(p.cipher_public_key),
            bytes(p.mask_public_key),
            bytes(p.signing_public_key),
            bytes(p.signature),
        )
        for p in msg.peers
    }
    if len(peers) != len(msg.peers):
        raise ProtocolError("the key directory names a peer twice")
    return KeyDirectory(msg.index, peers)


def shares_to_proto(round_id: str, shares: Iterable[EncryptedShare]) -> pb.SecAggShares:
    return pb.SecAggShares(
        round_id=round_id,
        shares=[
            pb.SecAggShare(sender=s.sender, recipient=s.recipient, ciphertext=s.ciphertext)
            for s in shares
        ],
    )


def shares_from_proto(msg: pb.SecAggShares) -> list[EncryptedShare]:
    out = []
    for s in msg.shares:
        if len(s.ciphertext) > _MAX_SHARE_CIPHERTEXT:
            raise ProtocolError("an encrypted share is larger than any real share")
        out.append(EncryptedShare(s.sender, s.recipient, bytes(s.ciphertext)))
    return out


def request_to_proto(round_id: str, request: UnmaskRequest) -> pb.SecAggUnmaskRequest:
    return pb.SecAggUnmaskRequest(
        round_id=round_id, survivors=sorted(request.survivors), dropped=sorted(request.dropped)
    )


def request_from_proto(msg: pb.SecAggUnmaskRequest) -> UnmaskRequest:
    return UnmaskRequest(frozenset(msg.survivors), frozenset(msg.dropped))


def response_to_proto(round_id: str, response: UnmaskResponse) -> pb.SecAggUnmaskShares:
    return pb.SecAggUnmaskShares(
        round_id=round_id,
        self_mask_shares=[
            pb.SecAggPlainShare(owner=o, value=v) for o, v in response.self_mask_shares.items()
        ],
        key_shares=[pb.SecAggPlainShare(owner=o, value=v) for o, v in response.key_shares.items()],
    )


def response_from_proto(msg: pb.SecAggUnmaskShares) -> UnmaskResponse:
    b = {s.owner: bytes(s.value) for s in msg.self_mask_shares}
    k = {s.owner: bytes(s.value) for s in msg.key_shares}
    if len(b) != len(msg.self_mask_shares) or len(k) != len(msg.key_shares):
        raise ProtocolError("unmasking shares name an owner twice")
    return UnmaskResponse(b, k)


def consistency_to_proto(round_id: str, sig: ConsistencySignature) -> pb.SecAggConsistency:
    return pb.SecAggConsistency(
        round_id=round_id,
        index=sig.index,
        signing_public_key=sig.signing_public,
        signature=sig.signature,
    )


def consistency_from_proto(msg: pb.SecAggConsistency) -> ConsistencySignature:
    return ConsistencySignature(msg.index, bytes(msg.signing_public_key), bytes(msg.signature))


def signatures_to_proto(
    round_id: str, signatures: Iterable[ConsistencySignature]
) -> pb.SecAggConsistencySignatures:
    return pb.SecAggConsistencySignatures(
        round_id=round_id, signatures=[consistency_to_proto(round_id, s) for s in signatures]
    )


def signatures_from_proto(msg: pb.SecAggConsistencySignatures) -> list[ConsistencySignature]:
    return [consistency_from_proto(s) for s in msg.signatures]
