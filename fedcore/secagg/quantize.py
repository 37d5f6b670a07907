"""Fixed point in Z_(2^k): how a float update becomes ring words, and back.

A worker's contribution is its model *delta* (trained minus received weights), which is small
and centred on zero, weighted by ``w = n / weight_norm`` (``n`` its example count, capped at
``weight_norm``, so ``0 < w <= 1``):

1. clip every coordinate to ``[-clip, clip]``;
2. scale by ``w * Q / clip`` with ``Q = 2^(bits-1) - 1``, so ``|x| <= Q``;
3. round *stochastically* to an integer: up with probability ``frac(x)``, down otherwise, so
   ``E[q] = x`` (up to 2^-16 of a step) — the rounding noise averages out over workers instead
   of piling up. The coin flips come from an AES-CTR keystream under a fresh 256-bit key;
4. store ``q`` in two's complement modulo ``2^k``.

The coordinator sums the ring vectors (mod ``2^k``) and reads the sum as a signed integer.
The sum cannot wrap when ``2^(k-1) > n_workers * (Q + 1)``; :func:`ring_bits_for` picks
``k`` = 32 when that holds and 64 otherwise. The quantization step of the aggregate is
``clip / Q`` (per unit of weight); clipping is the only bias, and the worker logs how many
coordinates it clipped.

Two extra words carry the (capped) example count ``n``: its low 16 bits and the rest, so
their sums stay in range for any number of workers the 32-bit ring allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedcore.errors import ConfigError, SecAggError

from . import prg

__all__ = ["COUNT_WORDS", "FixedPoint", "ring_bits_for"]

COUNT_WORDS = 2
_BLOCK = 1 << 16
_NOISE_BITS = 16


def ring_bits_for(quant_bits: int, num_workers: int) -> int:
    """32 if the sum of ``num_workers`` inputs of ``quant_bits`` fits in 32 bits, else 64."""
    headroom = math.ceil(math.log2(max(num_workers, 1))) + 1
    for k in (32, 64):
        if quant_bits + headroom <= k:
            return k
    raise ConfigError(
        f"{num_workers} workers at {quant_bits} quantization bits overflow a 64-bit ring; "
        "lower --secagg-bits"
    )


@dataclass(frozen=True, slots=True)
class FixedPoint:
    """The fixed-point format of one round."""

    bits: int
    clip: float
    ring_bits: int

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 48:
            raise ConfigError(f"quantization bits must be in 2..48, got {self.bits}")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ConfigError(f"the clipping range must be positive and finite, got {self.clip}")
        if self.ring_bits not in (32, 64):
            raise ConfigError(f"the ring has 32 or 64 bits, got {self.ring_bits}")
        if self.bits + 1 > self.ring_bits:
            raise ConfigError(
                f"{self.bits} quantization bits do not fit a {self.ring_bits}-bit ring"
            )

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger]:
        """The unsigned word type of the ring."""
        return np.dtype(np.uint32 if self.ring_bits == 32 else np.uint64)

    @property
    def levels(self) -> int:
        """``Q``: the largest quantized magnitude of a weight-1 coordinate."""
        return (1 << (self.bits - 1)) - 1

    @property
    def scale(self) -> float:
        """Ring units per unit of (weighted) value."""
        return self.levels / self.clip

    def quantize(
        self,
        values: npt.NDArray[np.floating],
        weight: float,
        noise_seed: bytes,
        out: npt.NDArray[np.unsignedinteger],
        *,
        accumulate: bool = False,
    ) -> int:
        """Write ``SR(clip(values) * weight * scale)`` as ring words into ``out`` (``accumulate``:
        add them to ``out`` instead, modulo ``2^k``, e.g. onto a mask computed beforehand);
        return how many coordinates were clipped.

        Stochastic rounding in integers: ``y = floor(x * 2^16)``, then
        ``q = (y + r) >> 16`` with ``r`` uniform in ``[0, 2^16)`` (16-bit words of the AES-CTR
        keystream under ``noise_seed``), so ``E[q] = y / 2^16``: unbiased up to 2^-16 of a
        quantization step.
        """
        if not 0 < weight <= 1:
            raise SecAggError(f"a quantization weight must be in (0, 1], got {weight}")
        flat = values.reshape(-1)
        if out.size != flat.size or out.dtype != self.dtype:
            raise SecAggError("the quantization output does not match the input")
        factor = weight * self.scale * (1 << _NOISE_BITS)
        clipped = 0
        noise = prg.Keystream(noise_seed)
        # Every pass writes into buffers made once, each a block long (they stay in cache).
        scaled = np.empty(min(_BLOCK, flat.size), np.float64)
        fixed = np.empty(scaled.size, np.int64)
        words = fixed.view(np.uint64) if self.ring_bits == 64 else np.empty(scaled.size, self.dtype)
        for start in range(0, flat.size, _BLOCK):
            block = flat[start : start + _BLOCK]
            n = block.size
            x, y, q = scaled[:n], fixed[:n], words[:n]
            # Two reductions decide whether any coordinate needs clipping (almost never; a NaN
            # fails both comparisons and takes the careful path too).
            if not (block.max() <= self.clip and block.min() >= -self.clip):
                x[...] = block
                clipped += int(np.count_nonzero(np.abs(x) > self.clip))
                np.clip(x, -self.clip, self.clip, out=x)
                x *= factor
            else:
                np.multiply(block, factor, out=x, dtype=np.float64)
            np.floor(x, out=x)
            np.copyto(y, x, casting="unsafe")
            np.add(y, noise.words(n, np.uint16), out=y)
            np.right_shift(y, _NOISE_BITS, out=y)
            if q.base is not fixed:
                np.copyto(q, y, casting="unsafe")  # two's complement mod 2^k
            target = out[start : start + n]
            if accumulate:
                np.add(target, q, out=target)
            else:
                target[...] = q
        return clipped

    def decode(self, total: npt.NDArray[np.unsignedinteger]) -> npt.NDArray[np.float64]:
        """The signed value of a ring sum, in units of weighted value."""
        signed = np.int32 if self.ring_bits == 32 else np.int64
        return total.view(signed).astype(np.float64) / self.scale


def encode_count(count: int, out: npt.NDArray[np.unsignedinteger]) -> None:
    """Store an example count in :data:`COUNT_WORDS` ring words."""
    out[0] = count & 0xFFFF
    out[1] = count >> 16


def decode_count(words: npt.NDArray[np.unsignedinteger]) -> int:
    """The summed example count from its two summed words."""
    return int(words[0]) + (int(words[1]) << 16)
