"""What a silo signs in the signed mode, as unambiguous byte strings.

Two statements, both bound to the whole round (its id, job, round number, threshold t, group
size m, the member list and the fixed-point format), so a signature made for one view of the
round never verifies against another:

* :func:`key_statement`: "in this round, silo S at index i publishes these two X25519 keys"
  (phase 1). A peer verifies it with *its own* view of the round: a coordinator that tells two
  workers different t, m or members makes every signature between them fail.
* :func:`request_statement`: "in this round I was asked to unmask for these survivors and
  these dropped workers" (phase 4a, Bonawitz et al.'s consistency check). A worker reveals
  shares only when at least t of its group signed the very request it was shown.

Every field is length-prefixed, so no two different tuples encode to the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable

from .messages import RoundSetup, UnmaskRequest

__all__ = ["key_statement", "request_statement", "round_binding"]

_LABEL = b"fedcore-secagg-signed-v1"


def _encode(parts: Iterable[bytes]) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _ints(values: Iterable[int]) -> bytes:
    return b"".join(v.to_bytes(4, "big") for v in sorted(values))


def round_binding(setup: RoundSetup) -> bytes:
    """Everything about the round that every participant must agree on."""
    fp = setup.fixed_point
    return _encode(
        [
            _LABEL,
            setup.round_id.encode(),
            setup.job.encode(),
            setup.round_number.to_bytes(8, "big"),
            setup.threshold.to_bytes(4, "big"),
            setup.group_size.to_bytes(4, "big"),
            _encode(m.encode() for m in setup.members),
            f"{fp.bits}/{fp.ring_bits}/{fp.clip!r}/{setup.weight_norm!r}".encode(),
        ]
    )


def key_statement(
    setup: RoundSetup, index: int, silo: str, cipher: bytes, mask: bytes, signing: bytes
) -> bytes:
    """Phase 1: silo ``silo`` at ``index`` publishes ``cipher`` and ``mask``."""
    return _encode(
        [
            b"keys",
            round_binding(setup),
            index.to_bytes(4, "big"),
            silo.encode(),
            cipher,
            mask,
            signing,
        ]
    )


def request_statement(setup: RoundSetup, request: UnmaskRequest, signer: int) -> bytes:
    """Phase 4a: ``signer`` was asked to unmask ``request``."""
    return _encode(
        [
            b"survivors",
            round_binding(setup),
            signer.to_bytes(4, "big"),
            _ints(request.survivors),
            _ints(request.dropped),
        ]
    )
