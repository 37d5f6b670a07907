"""The building blocks of secure aggregation: Shamir, the PRG, key agreement and AEAD, fixed
point. Golden values where the math is fixed, hypothesis for the properties."""

from __future__ import annotations

import random

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.errors import ConfigError, SecAggError
from fedcore.secagg import crypto, prg, shamir
from fedcore.secagg.params import SecAggParams, harary_neighbours
from fedcore.secagg.quantize import FixedPoint, decode_count, encode_count, ring_bits_for

secrets32 = st.binary(min_size=32, max_size=32)


# ---------------------------------------------------------------------------- Shamir


@settings(max_examples=60, deadline=None)
@given(secret=secrets32, n=st.integers(1, 12), data=st.data())
def test_any_t_shares_reconstruct_the_secret(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    holders = data.draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n, unique=True))
    shares = shamir.split(secret, holders, t)
    subset = data.draw(st.permutations(shares))[: data.draw(st.integers(t, n))]
    assert shamir.combine(subset, t) == secret


@settings(max_examples=40, deadline=None)
@given(secret=secrets32, other=secrets32, t=st.integers(2, 8), data=st.data())
def test_fewer_than_t_shares_are_consistent_with_any_secret(
    secret: bytes, other: bytes, t: int, data: st.DataObject
) -> None:
    """Perfect secrecy, constructively: for t-1 shares of ``secret`` and any ``other``, there
    is a degree t-1 polynomial through those shares with constant term ``other``."""
    holders = list(range(1, t + 2))
    shares = shamir.split(secret, holders, t)
    seen = data.draw(st.permutations(shares))[: t - 1]
    # Add the point (0, other) and interpolate: the polynomial through it and the t-1 shares
    # gives a full set of t shares that reconstructs ``other`` and agrees on every seen share.
    anchor = shamir.Share(len(holders) + 1, 0)
    points = [*seen, shamir.Share(anchor.x, _interpolate([*seen, _zero(other)], anchor.x))]
    assert shamir.combine(points, t) == other
    for s in seen:
        assert s in points


def _zero(secret: bytes) -> shamir.Share:
    return shamir.Share(0, int.from_bytes(secret, "big"))


def _interpolate(points: list[shamir.Share], x: int) -> int:
    p = shamir.PRIME
    total = 0
    for j, pj in enumerate(points):
        num, den = 1, 1
        for m, pm in enumerate(points):
            if m != j:
                num = num * (x - pm.x) % p
                den = den * (pj.x - pm.x) % p
        total = (total + pj.y * num * pow(den, -1, p)) % p
    return total


def test_shamir_golden_value_with_fixed_coefficients() -> None:
    # f(x) = s + 5x + 7x^2 with s = 1: f(1) = 13, f(2) = 39, f(3) = 79.
    coefficients = iter([5, 7])
    shares = shamir.split(
        (1).to_bytes(32, "big"), [1, 2, 3], 3, randbelow=lambda _: next(coefficients)
    )
    assert [(s.x, s.y) for s in shares] == [(1, 13), (2, 39), (3, 79)]
    assert shamir.combine(shares, 3) == (1).to_bytes(32, "big")


def test_shamir_refuses_bad_input() -> None:
    s = bytes(32)
    with pytest.raises(SecAggError, match="32 bytes"):
        shamir.split(b"short", [1, 2], 2)
    with pytest.raises(SecAggError, match="impossible"):
        shamir.split(s, [1, 2], 3)
    with pytest.raises(SecAggError, match="distinct"):
        shamir.split(s, [1, 1], 2)
    with pytest.raises(SecAggError, match="nonzero"):
        shamir.split(s, [0, 1], 2)
    shares = shamir.split(s, [1, 2, 3], 2)
    with pytest.raises(SecAggError, match="cannot reconstruct"):
        shamir.combine(shares[:1], 2)
    tampered = [shares[0], shamir.Share(shares[1].x, (shares[1].y + 1) % shamir.PRIME)]
    with pytest.raises(SecAggError, match="inconsistent"):
        shamir.combine(tampered, 2)
    with pytest.raises(SecAggError, match="outside the field"):
        shamir.Share.from_bytes(1, b"\xff" * shamir.SHARE_BYTES)


def test_share_bytes_round_trip() -> None:
    share = shamir.split(bytes(range(32)), [7], 1)[0]
    assert shamir.Share.from_bytes(7, share.value_bytes()) == share


# ---------------------------------------------------------------------------- PRG


def test_prg_is_aes256_ctr_keystream_golden() -> None:
    # AES-256-CTR keystream for the all-zero key and IV: the first block is AES_0(0).
    words = prg.expand(bytes(32), 4, np.uint32)
    assert words.astype("<u4").tobytes().hex() == "dc95c078a2408989ad48a21492842087"


def test_prg_blockwise_equals_one_shot_and_signs_cancel() -> None:
    seed_a, seed_b = bytes(range(32)), bytes(range(1, 33))
    count = prg.BLOCK_BYTES // 8 * 3 + 17  # several blocks and a ragged tail
    v = np.zeros(count, np.uint64)
    prg.apply_masks(v, plus=[seed_a, seed_b])
    expected = prg.expand(seed_a, count, np.uint64) + prg.expand(seed_b, count, np.uint64)
    np.testing.assert_array_equal(v, expected)
    prg.apply_masks(v, minus=[seed_a, seed_b])
    assert not v.any()


def test_prg_refuses_short_seeds_and_wrong_vectors() -> None:
    with pytest.raises(SecAggError, match="256 bits"):
        prg.expand(b"\x01\x02\x03\x04", 4, np.uint32)
    with pytest.raises(SecAggError, match="uint32 or uint64"):
        prg.apply_masks(np.zeros(4, np.int32), plus=[bytes(32)])


# ---------------------------------------------------------------------------- keys


def test_key_agreement_is_symmetric_and_bound_to_purpose_and_round() -> None:
    a, b = crypto.KeyPair.generate(), crypto.KeyPair.generate()
    k_ab = crypto.agree(a.private, b.public, purpose="mask", round_id="r1")
    assert k_ab == crypto.agree(b.private, a.public, purpose="mask", round_id="r1")
    assert len(k_ab) == 32
    assert k_ab != crypto.agree(a.private, b.public, purpose="share", round_id="r1")
    assert k_ab != crypto.agree(a.private, b.public, purpose="mask", round_id="r2")
    assert crypto.public_from_private(a.private) == a.public


def test_sealed_shares_cannot_be_read_altered_or_rerouted() -> None:
    key = bytes(range(32))
    sealed = crypto.seal(key, b"share", b"r/1->2")
    assert b"share" not in sealed
    assert crypto.open_sealed(key, sealed, b"r/1->2") == b"share"
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    for blob, aad in [(flipped, b"r/1->2"), (sealed, b"r/3->2")]:
        with pytest.raises(SecAggError, match="failed authentication"):
            crypto.open_sealed(key, blob, aad)


def test_low_order_public_key_is_refused() -> None:
    with pytest.raises(SecAggError, match="invalid"):
        crypto.agree(crypto.KeyPair.generate().private, bytes(32), purpose="mask", round_id="r")


# ---------------------------------------------------------------------------- fixed point


def test_ring_bits_leave_headroom_for_the_sum() -> None:
    assert ring_bits_for(16, 2) == 32
    assert ring_bits_for(16, 32768) == 32
    assert ring_bits_for(16, 32769) == 64
    assert ring_bits_for(24, 1000) == 64


def test_stochastic_rounding_is_unbiased_and_bounded() -> None:
    fp = FixedPoint(bits=8, clip=1.0, ring_bits=32)
    x = np.full(200_000, 0.3 / fp.scale * 10 + 0.123 / fp.scale)  # between two levels
    out = np.empty(x.size, fp.dtype)
    fp.quantize(x, 1.0, bytes(32), out)
    decoded = fp.decode(out)
    assert set(np.unique(out.view(np.int32))) <= {3, 4}
    assert decoded.mean() == pytest.approx(x[0], rel=1e-3)


def test_quantize_clips_and_counts_and_decodes_signed() -> None:
    fp = FixedPoint(bits=16, clip=0.5, ring_bits=64)
    x = np.array([-2.0, -0.5, 0.0, 0.25, 0.5, 3.0])
    out = np.empty(x.size, fp.dtype)
    clipped = fp.quantize(x, 1.0, bytes(32), out)
    assert clipped == 2
    np.testing.assert_allclose(fp.decode(out), np.clip(x, -0.5, 0.5), atol=1 / fp.scale)


def _reference_quantize(
    fp: FixedPoint, x: np.ndarray, weight: float, seed: bytes
) -> tuple[np.ndarray, int]:
    """The quantizer written plainly, whole vector at a time (clip, scale, floor, add 16 noise
    bits of the same keystream, shift, wrap)."""
    noise = prg.Keystream(seed)
    values = x.astype(np.float64)
    clipped = int(np.count_nonzero(np.abs(values) > fp.clip))
    values = np.clip(values, -fp.clip, fp.clip) * (weight * fp.scale * 65536)
    fixed = np.floor(values).astype(np.int64)
    block = 1 << 16
    for start in range(0, x.size, block):  # the keystream is read a block at a time
        n = min(block, x.size - start)
        fixed[start : start + n] += noise.words(n, np.uint16)
    return (fixed >> 16).astype(fp.dtype), clipped


@pytest.mark.parametrize(("bits", "ring_bits"), [(16, 32), (16, 64), (40, 64)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_blockwise_quantizer_matches_the_plain_one_bit_for_bit(
    bits: int, ring_bits: int, dtype: type
) -> None:
    """Across blocks, with clipped coordinates in some blocks only, and onto a vector that
    already holds words (``accumulate``, as onto a mask expanded ahead): modular sums."""
    fp = FixedPoint(bits=bits, clip=1.0, ring_bits=ring_bits)
    rng = np.random.default_rng(bits + ring_bits)
    x: npt.NDArray[np.floating] = rng.uniform(-0.9, 0.9, 150_001).astype(dtype)
    x[70_000:70_010] = 5.0  # the second block clips, the others do not
    seed = bytes(range(32))
    expected, expected_clipped = _reference_quantize(fp, x, 0.3, seed)
    out = np.empty(x.size, fp.dtype)
    assert fp.quantize(x, 0.3, seed, out) == expected_clipped == 10
    assert out.tobytes() == expected.tobytes()
    base = rng.integers(0, 2**ring_bits, x.size, dtype=fp.dtype)
    onto = base.copy()
    fp.quantize(x, 0.3, seed, onto, accumulate=True)
    assert onto.tobytes() == (base + expected).tobytes()


def test_example_counts_round_trip_through_two_words() -> None:
    words = np.zeros(2, np.uint32)
    total = np.zeros(2, np.uint32)
    counts = [1, 65_535, 65_536, 1_000_000, 7]
    for c in counts:
        encode_count(c, words)
        total += words
    assert decode_count(total) == sum(counts)


# ---------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    ("threshold", "n", "expected"),
    [(0.5, 2, 2), (0.5, 3, 2), (0.5, 10, 6), (0.66, 10, 7), (3.0, 5, 3)],
)
def test_threshold(threshold: float, n: int, expected: int) -> None:
    assert SecAggParams(threshold=threshold).threshold_for(n) == expected


def test_bad_settings_explain_themselves() -> None:
    with pytest.raises(ConfigError, match="secagg-threshold"):
        SecAggParams(threshold=1.5)
    with pytest.raises(ConfigError, match="exceeds the sharing group"):
        SecAggParams(threshold=9).threshold_for(4)
    with pytest.raises(ConfigError, match="secagg-clip"):
        SecAggParams(clip=0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 80), k=st.integers(2, 20), seed=st.integers(0, 1000))
def test_secagg_plus_graph_is_regular_and_symmetric(n: int, k: int, seed: int) -> None:
    params = SecAggParams(neighbours=k)
    degree = params.degree(n)
    graph = harary_neighbours(list(range(1, n + 1)), degree, random.Random(seed))
    assert all(len(peers) == degree for peers in graph.values())
    assert all(u in graph[v] and u != v for u, peers in graph.items() for v in peers)
