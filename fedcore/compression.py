"""Update compression: float16 or 8-bit quantized model deltas, with error feedback.

The wire format stays typed raw bytes: a compressed update is an ordinary payload whose
signature is derived from the model's (see :func:`compressed_signature`), so the coordinator
checks its header *before* allocating anything, exactly like a full-precision update:

* ``float16``: every float tensor of the delta as ``float16`` (2x smaller than float32);
  finiteness is checked as for any float payload.
* ``int8``: every float tensor as ``int8`` with one symmetric scale per tensor,
  ``delta ~= q * scale``; the scales travel as one extra ``float32`` tensor named
  :data:`SCALES_NAME` (one entry per float tensor, in order), so the update is about 4x
  smaller. Scales must be finite and non-negative.

Non-float tensors (integer buffers) are sent unchanged. Compressed updates are always
*deltas* (updated weights minus the weights received): deltas are small and centred on
zero, which is what low precision represents well.

**Error feedback** (Seide et al. 2014; Karimireddy et al. 2019, "EF-SGD"): the worker keeps
what compression lost (``residual = intended - decompressed``) and adds it to its next
delta, so quantization error is delayed, not lost, and the global model follows the
full-precision trajectory closely. The residual lives in the worker's memory only.

``bfloat16`` is not offered: numpy has no bfloat16 type, so the coordinator could not
validate or decode it without torch; ``float16`` with error feedback gives the same 2x saving
with more mantissa bits, which suits small deltas better.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedcore.errors import ConfigError, PayloadError
from fedcore.weights import ModelSignature, TensorSignature, Weights

__all__ = [
    "EXTRA_KEY",
    "SCALES_NAME",
    "SCHEMES",
    "Compressor",
    "compressed_signature",
    "decompress",
    "scheme_code",
    "scheme_from_code",
]

SCHEMES = ("none", "float16", "int8")
# The plan carries the scheme as a number in TrainConfig.extra under this key.
EXTRA_KEY = "compression"
SCALES_NAME = "__fedcore_int8_scales__"
_CODES = {"none": 0.0, "float16": 1.0, "int8": 2.0}


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown update compression {scheme!r}; use one of {', '.join(SCHEMES)}")


def scheme_code(scheme: str) -> float:
    """The number that stands for ``scheme`` in a plan's ``extra`` map."""
    _check_scheme(scheme)
    return _CODES[scheme]


def scheme_from_code(code: float) -> str:
    """The scheme a plan asks for; :class:`ConfigError` for a code this version lacks."""
    for name, value in _CODES.items():
        if value == code:
            return name
    raise ConfigError(
        f"the coordinator asks for update compression code {code:g}, which this fedcore "
        "version does not know; install the coordinator's fedcore version on this worker"
    )


def _is_float(dtype: str) -> bool:
    return np.dtype(dtype).kind == "f"


def compressed_signature(signature: ModelSignature, scheme: str) -> ModelSignature:
    """The signature of a compressed update of a model with ``signature``."""
    _check_scheme(scheme)
    if scheme == "none":
        return signature
    if any(t.name == SCALES_NAME for t in signature):
        raise ConfigError(
            f"the model has a parameter named {SCALES_NAME!r}, which int8 compression "
            "reserves; rename it or use --compression float16"
        )
    wire = "float16" if scheme == "float16" else "int8"
    out = [TensorSignature(t.name, wire, t.shape) if _is_float(t.dtype) else t for t in signature]
    if scheme == "int8":
        floats = sum(1 for t in signature if _is_float(t.dtype))
        out.append(TensorSignature(SCALES_NAME, "float32", (floats,)))
    return tuple(out)


def _quantize_int8(
    v: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.int8], float]:
    peak = float(np.max(np.abs(v))) if v.size else 0.0
    scale = peak / 127.0 if peak > 0 else 1.0
    q = np.clip(np.rint(v / scale), -127, 127).astype(np.int8)
    return q, scale


class Compressor:
    """Compresses a worker's deltas with error feedback (one instance per worker)."""

    def __init__(self, scheme: str) -> None:
        _check_scheme(scheme)
        self.scheme = scheme
        self._residual: dict[str, npt.NDArray[np.float32]] = {}

    def reset(self) -> None:
        """Forget the carried error (for example when the model changes)."""
        self._residual.clear()

    def compress(self, delta: Weights) -> Weights:
        """The payload to send for ``delta``; what it loses is carried into the next call."""
        if self.scheme == "none":
            return delta
        if set(self._residual) - set(delta):
            self.reset()
        out: Weights = {}
        scales: list[float] = []
        for name, array in delta.items():
            if array.dtype.kind != "f":
                out[name] = array
                continue
            intended = np.asarray(array, dtype=np.float32)
            residual = self._residual.get(name)
            if residual is not None and residual.shape == intended.shape:
                intended = intended + residual
            if self.scheme == "float16":
                with np.errstate(over="ignore"):
                    sent = intended.astype(np.float16)
                if not np.isfinite(sent).all():
                    raise PayloadError(
                        f"the update of {name!r} exceeds the float16 range (|delta| > 65504); "
                        "lower the learning rate, or use --compression int8"
                    )
                restored = sent.astype(np.float32)
                out[name] = sent
            else:
                q, scale = _quantize_int8(intended)
                restored = q.astype(np.float32) * np.float32(scale)
                out[name] = q
                scales.append(scale)
            self._residual[name] = intended - restored
        if self.scheme == "int8":
            out[SCALES_NAME] = np.asarray(scales, dtype=np.float32)
        return out


def decompress(payload: Weights, signature: ModelSignature, scheme: str) -> Weights:
    """The float deltas of a validated compressed payload, in the model's dtypes.

    ``payload`` must already match :func:`compressed_signature` (the coordinator's payload
    assembler checks that, and the finiteness of float tensors, before this is called).
    """
    _check_scheme(scheme)
    if scheme == "none":
        return payload
    scales: npt.NDArray[np.float32] | None = None
    if scheme == "int8":
        scales = np.asarray(payload[SCALES_NAME], dtype=np.float32)
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise PayloadError("int8 update has a negative or non-finite scale")
    out: Weights = {}
    index = 0
    for t in signature:
        array = payload[t.name]
        if not _is_float(t.dtype):
            out[t.name] = array
            continue
        restored = array.astype(t.dtype)
        if scales is not None:
            restored *= scales[index].astype(t.dtype)
            index += 1
        out[t.name] = restored
    return out
