"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A secret ``s`` (read as a 256-bit big-endian integer) is the constant term of a random
polynomial ``f`` of degree ``t - 1``; the share for holder ``x`` (a nonzero field element) is
``(x, f(x))``. Any ``t`` shares give ``s`` back by Lagrange interpolation at 0; any ``t - 1``
are uniformly distributed whatever ``s`` is. The field is far larger than the secrets, so a
reconstruction from wrong shares is detected (with overwhelming probability) because the
result does not fit in 256 bits.

A hostile holder can still shift a reconstruction undetectably within one set of ``t`` shares
(the secret is linear in each share), so when more than ``t`` shares arrive,
:func:`combine_robust` uses the extra ones: it accepts only a polynomial that agrees with
enough of them to be unique (Reed-Solomon unique decoding: ``ceil((k + t) / 2)`` of ``k``),
and says which shares disagree. One wrong share among ``t + 2`` or more is found and ignored.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from fedcore.errors import SecAggError

__all__ = ["PRIME", "SECRET_BYTES", "SHARE_BYTES", "Share", "combine", "combine_robust", "split"]

#: The Mersenne prime 2^521 - 1: the field every share lives in.
PRIME = (1 << 521) - 1
SECRET_BYTES = 32
#: Bytes of one share value on the wire (big-endian, fixed width).
SHARE_BYTES = 66


@dataclass(frozen=True, slots=True)
class Share:
    """One point ``(x, y)`` of the sharing polynomial; ``x`` identifies the holder."""

    x: int
    y: int

    def value_bytes(self) -> bytes:
        """``y`` as fixed-width big-endian bytes."""
        return self.y.to_bytes(SHARE_BYTES, "big")

    @classmethod
    def from_bytes(cls, x: int, value: bytes) -> Share:
        """A share from its holder and wire value; refuses values outside the field."""
        if len(value) != SHARE_BYTES:
            raise SecAggError(f"a share must be {SHARE_BYTES} bytes, got {len(value)}")
        y = int.from_bytes(value, "big")
        if y >= PRIME or not 0 < x < PRIME:
            raise SecAggError("a share lies outside the field")
        return cls(x, y)


def _check_xs(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise SecAggError("share holders must be distinct")
    if any(not 0 < x < PRIME for x in xs):
        raise SecAggError("share holders must be nonzero field elements")


def split(
    secret: bytes,
    holders: Sequence[int],
    threshold: int,
    *,
    randbelow: object = None,
) -> list[Share]:
    """Share ``secret`` (32 bytes) among ``holders`` so that any ``threshold`` recover it.

    Args:
        secret: exactly :data:`SECRET_BYTES` bytes.
        holders: distinct nonzero x-coordinates, one per share.
        threshold: shares needed to reconstruct, ``1 <= threshold <= len(holders)``.
        randbelow: a ``randbelow(n)`` callable for the coefficients (default: the OS CSPRNG);
            injectable for deterministic tests only.
    """
    if len(secret) != SECRET_BYTES:
        raise SecAggError(f"a secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(holders):
        raise SecAggError(f"threshold {threshold} is impossible with {len(holders)} share holders")
    _check_xs(holders)
    draw = randbelow if callable(randbelow) else secrets.randbelow
    coefficients = [int.from_bytes(secret, "big")] + [
        int(draw(PRIME)) for _ in range(threshold - 1)
    ]
    shares = []
    for x in holders:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append(Share(x, y))
    return shares


def combine(shares: Sequence[Share], threshold: int) -> bytes:
    """Reconstruct the secret from at least ``threshold`` shares (the first ``threshold``
    are used); raises :class:`SecAggError` if the shares are too few or inconsistent."""
    if threshold < 1 or len(shares) < threshold:
        raise SecAggError(
            f"{len(shares)} share(s) cannot reconstruct a secret of threshold {threshold}"
        )
    points = list(shares[:threshold])
    _check_xs([s.x for s in points])
    secret = 0
    for j, sj in enumerate(points):
        num, den = 1, 1
        for m, sm in enumerate(points):
            if m != j:
                num = num * sm.x % PRIME
                den = den * (sm.x - sj.x) % PRIME
        secret = (secret + sj.y * num * pow(den, -1, PRIME)) % PRIME
    if secret >> (8 * SECRET_BYTES):
        raise SecAggError("the shares are inconsistent: they do not reconstruct a 256-bit secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def _evaluate(points: Sequence[Share], x: int) -> int:
    """The degree ``len(points) - 1`` polynomial through ``points``, evaluated at ``x``."""
    total = 0
    for j, pj in enumerate(points):
        num, den = 1, 1
        for m, pm in enumerate(points):
            if m != j:
                num = num * (x - pm.x) % PRIME
                den = den * (pj.x - pm.x) % PRIME
        total = (total + pj.y * num * pow(den, -1, PRIME)) % PRIME
    return total


def _candidates(k: int, t: int, tries: int) -> Iterator[list[int]]:
    """Index sets of size ``t`` to interpolate from: the first ``t``, each of them left out
    in turn (finds one wrong share), then random sets (several wrong shares)."""
    yield list(range(t))
    for left_out in range(t):
        yield [i for i in range(t + 1) if i != left_out]
    rng = random.Random(secrets.randbits(64))
    for _ in range(tries):
        yield sorted(rng.sample(range(k), t))


def combine_robust(
    shares: Sequence[Share], threshold: int, *, tries: int = 200
) -> tuple[bytes, list[int]]:
    """Reconstruct the secret when some of ``shares`` may be wrong; return it and the holders
    whose shares disagree with it.

    With ``k > threshold`` shares, a candidate polynomial (through ``threshold`` of them) is
    accepted only if at least ``ceil((k + threshold) / 2)`` shares lie on it: then it is the
    only such polynomial, so wrong shares can neither make it fail nor change it. With
    ``k == threshold`` nothing can be cross-checked, and this is :func:`combine`. Raises
    :class:`SecAggError` when no candidate gathers enough agreement (too many wrong shares).
    """
    k = len(shares)
    if k <= threshold:
        return combine(shares, threshold), []
    _check_xs([s.x for s in shares])
    need = (k + threshold + 1) // 2
    for indexes in _candidates(k, threshold, tries):
        points = [shares[i] for i in indexes]
        agree = [s for s in shares if _evaluate(points, s.x) == s.y]
        if len(agree) < need:
            continue
        secret = _evaluate(points, 0)
        if secret >> (8 * SECRET_BYTES):
            continue
        bad = sorted({s.x for s in shares} - {s.x for s in agree})
        return secret.to_bytes(SECRET_BYTES, "big"), bad
    raise SecAggError(
        f"the shares are inconsistent: no polynomial of degree {threshold - 1} agrees with "
        f"{need} of the {k} shares"
    )
