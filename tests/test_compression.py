"""Update compression: signatures, round trips, error feedback, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.codec import PayloadAssembler, iter_chunks, make_header
from fedcore.compression import (
    SCALES_NAME,
    Compressor,
    compressed_signature,
    decompress,
    scheme_code,
    scheme_from_code,
)
from fedcore.errors import ConfigError, ModelMismatchError, PayloadError
from fedcore.weights import Weights, signature_of


def _delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(0, 0.01, (20, 30)).astype(np.float32),
        "b": rng.normal(0, 0.01, (30,)).astype(np.float32),
        "steps": np.array([3], dtype=np.int64),
    }


def test_compressed_signature_keeps_names_and_shapes_and_adds_int8_scales() -> None:
    sig = signature_of(_delta())
    assert compressed_signature(sig, "none") == sig
    fp16 = compressed_signature(sig, "float16")
    assert [(t.name, t.dtype, t.shape) for t in fp16] == [
        ("w", "float16", (20, 30)),
        ("b", "float16", (30,)),
        ("steps", "int64", (1,)),
    ]
    int8 = compressed_signature(sig, "int8")
    assert [t.dtype for t in int8] == ["int8", "int8", "int64", "float32"]
    assert int8[-1].name == SCALES_NAME
    assert int8[-1].shape == (2,)


@pytest.mark.parametrize(("scheme", "ratio"), [("float16", 2), ("int8", 4)])
def test_compressed_updates_travel_as_typed_payloads_and_decode_close(
    scheme: str, ratio: int
) -> None:
    delta = _delta()
    sig = signature_of(delta)
    payload = Compressor(scheme).compress(delta)
    # The coordinator's checks: the payload's header must match the compressed signature.
    header = make_header(payload, 1024)
    assembler = PayloadAssembler(
        header, max_bytes=10**6, max_chunk_bytes=1024, expected=compressed_signature(sig, scheme)
    )
    for i, data in enumerate(iter_chunks(payload, 1024)):
        from fedcore.v1 import fedcore_pb2 as pb

        assembler.add(pb.PayloadChunk(index=i, data=data))
    restored = decompress(assembler.weights(), sig, scheme)
    assert signature_of(restored) == sig
    float_bytes = delta["w"].nbytes + delta["b"].nbytes
    sent_float = payload["w"].nbytes + payload["b"].nbytes
    assert sent_float * ratio == float_bytes
    tolerance = 1e-5 if scheme == "float16" else float(np.abs(delta["w"]).max()) / 127
    np.testing.assert_allclose(restored["w"], delta["w"], atol=tolerance)
    np.testing.assert_array_equal(restored["steps"], delta["steps"])


def test_a_payload_of_the_wrong_precision_is_refused_before_allocation() -> None:
    delta = _delta()
    full = make_header(delta, 1024)
    with pytest.raises(ModelMismatchError, match="'w' is float32\\[20, 30\\], expected float16"):
        PayloadAssembler(
            full,
            max_bytes=10**6,
            max_chunk_bytes=1024,
            expected=compressed_signature(signature_of(delta), "float16"),
        )


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from(["float16", "int8"]),
    st.integers(0, 2**31 - 1),
    st.integers(2, 12),
)
def test_error_feedback_keeps_the_running_sum_within_one_step_of_error(
    scheme: str, seed: int, rounds: int
) -> None:
    # Sum of what was sent = sum of what was intended - the carried residual; the residual
    # stays as small as one quantization step, so no error accumulates over rounds.
    compressor = Compressor(scheme)
    sig = signature_of(_delta())
    intended = np.zeros((20, 30), np.float64)
    sent = np.zeros((20, 30), np.float64)
    for r in range(rounds):
        delta = _delta(seed + r)
        intended += delta["w"]
        sent += decompress(compressor.compress(delta), sig, scheme)["w"]
    # Half a quantization step of entries below 0.08 (a 6-sigma delta plus the residual).
    step = 0.08 * 2.0**-11 if scheme == "float16" else 0.08 / 127
    assert np.abs(intended - sent).max() <= step


def test_without_error_feedback_int8_would_lose_small_updates() -> None:
    # A tiny entry next to a large one rounds to zero every round; error feedback sends it
    # eventually.
    compressor = Compressor("int8")
    delta = {"w": np.array([1.0, 0.003], dtype=np.float32)}
    sig = signature_of(delta)
    total = sum(decompress(compressor.compress(delta), sig, "int8")["w"][1] for _ in range(10))
    assert total == pytest.approx(0.03, abs=1.0 / 127)
    assert total > 0


def test_refusals_name_the_problem_and_the_fix() -> None:
    with pytest.raises(ConfigError, match="use one of none, float16, int8"):
        Compressor("bfloat17")
    with pytest.raises(ConfigError, match="install the coordinator's fedcore version"):
        scheme_from_code(9.0)
    assert scheme_from_code(scheme_code("int8")) == "int8"
    with pytest.raises(PayloadError, match=r"exceeds the float16 range.*--compression int8"):
        Compressor("float16").compress({"w": np.array([1e6], dtype=np.float32)})
    sig = signature_of({"w": np.zeros(2, np.float32)})
    bad: Weights = {"w": np.zeros(2, np.int8), SCALES_NAME: np.array([-1.0], np.float32)}
    with pytest.raises(PayloadError, match="negative or non-finite scale"):
        decompress(bad, sig, "int8")
