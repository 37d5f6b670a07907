"""The mask generator: AES-256 in counter mode keyed with a full 256-bit secret.

``PRG(seed)`` is the AES-256-CTR keystream under key ``seed`` (zero IV: every seed is used
for one vector only, since seeds are fresh or derived per round), read as little-endian
uint32 or uint64 words. Masks are added or subtracted in place, block by block, so the
keystream never exists in full and the vector stays in cache while every mask touches it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from fedcore.errors import SecAggError

__all__ = ["BLOCK_BYTES", "Keystream", "apply_masks", "expand"]

#: Keystream bytes produced per step (fits in L2 next to the vector slice).
BLOCK_BYTES = 1 << 18
_ZERO_IV = bytes(16)
_ZEROS = memoryview(bytes(BLOCK_BYTES))


def _keystream(seed: bytes) -> CipherContext:
    if len(seed) != 32:
        raise SecAggError(f"a mask seed must have 32 bytes (256 bits), got {len(seed)}")
    return Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()


class Keystream:
    """Consecutive words of ``PRG(seed)``, a block at a time (at most :data:`BLOCK_BYTES`)."""

    def __init__(self, seed: bytes) -> None:
        self._stream = _keystream(seed)
        self._buffer = bytearray(BLOCK_BYTES + 16)

    def words(self, count: int, dtype: npt.DTypeLike) -> npt.NDArray[np.unsignedinteger]:
        """The next ``count`` words; a view valid until the next call."""
        dt = np.dtype(dtype).newbyteorder("<")
        size = count * dt.itemsize
        if size > BLOCK_BYTES:
            raise SecAggError(f"at most {BLOCK_BYTES} keystream bytes at a time")
        self._stream.update_into(_ZEROS[:size], self._buffer)
        return np.frombuffer(self._buffer, dtype=dt, count=count)


def expand(seed: bytes, count: int, dtype: npt.DTypeLike) -> npt.NDArray[np.unsignedinteger]:
    """``count`` words of ``PRG(seed)`` (for tests and small vectors)."""
    out = np.zeros(count, dtype=np.dtype(dtype))
    apply_masks(out, plus=[seed])
    return out


def apply_masks(
    vector: npt.NDArray[np.unsignedinteger],
    *,
    plus: Sequence[bytes] = (),
    minus: Sequence[bytes] = (),
) -> None:
    """``vector += sum PRG(plus) - sum PRG(minus)`` modulo 2^(word bits), in place."""
    dtype = vector.dtype
    if dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)):
        raise SecAggError(f"masks apply to uint32 or uint64 vectors, not {dtype}")
    if not vector.flags.c_contiguous or vector.ndim != 1:
        raise SecAggError("masks apply to flat contiguous vectors")
    streams = [(_keystream(s), np.add) for s in plus] + [
        (_keystream(s), np.subtract) for s in minus
    ]
    if not streams:
        return
    word = dtype.itemsize
    buffer = bytearray(BLOCK_BYTES + 16)
    words = np.frombuffer(buffer, dtype=dtype.newbyteorder("<"), count=BLOCK_BYTES // word)
    per_block = BLOCK_BYTES // word
    for start in range(0, vector.size, per_block):
        target = vector[start : start + per_block]
        n = target.size
        for stream, op in streams:
            stream.update_into(_ZEROS[: n * word], buffer)
            op(target, words[:n], out=target)
