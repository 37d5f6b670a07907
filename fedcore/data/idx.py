"""Read and write IDX files, the format of the MNIST database.

An IDX file is a 4-byte magic (two zero bytes, a dtype code, the number of dimensions),
one big-endian uint32 per dimension, then the data in C order, big-endian. Files may be
gzip-compressed; :func:`read_idx` detects that by content, not by extension.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedcore.errors import ConfigError, DataError

__all__ = ["read_idx", "write_idx"]

_GZIP_MAGIC = b"\x1f\x8b"

# IDX dtype code -> big-endian numpy dtype, as the file stores it.
_CODE_TO_DTYPE: dict[int, np.dtype[Any]] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_KIND_TO_CODE: dict[str, int] = {dt.str[1:]: code for code, dt in _CODE_TO_DTYPE.items()}
_SUPPORTED = "uint8, int8, int16, int32, float32, float64"


def read_idx(path: str | Path) -> npt.NDArray[Any]:
    """Read an IDX file (gzip-compressed or raw) into a native-endian array.

    Raises:
        DataError: the file is missing, not valid gzip, or not a well-formed IDX file.
    """
    p = Path(path)
    buf = _read_maybe_gzip(p)
    if len(buf) < 4:
        raise DataError(
            f"{p}: only {len(buf)} bytes, too short for an IDX header; "
            "the file is truncated, copy it again"
        )
    if buf[0] != 0 or buf[1] != 0:
        raise DataError(
            f"{p}: bad IDX magic {buf[:4].hex()} (expected two zero bytes first); "
            "this is not an IDX file"
        )
    code, ndim = buf[2], buf[3]
    file_dtype = _CODE_TO_DTYPE.get(code)
    if file_dtype is None:
        raise DataError(
            f"{p}: unknown IDX dtype code 0x{code:02X}; supported are 0x08 uint8, "
            "0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64"
        )
    if ndim == 0:
        raise DataError(f"{p}: IDX header declares 0 dimensions; the file is corrupt")
    header_len = 4 + 4 * ndim
    if len(buf) < header_len:
        raise DataError(
            f"{p}: truncated IDX header ({len(buf)} of {header_len} bytes); copy the file again"
        )
    shape = struct.unpack(f">{ndim}I", buf[4:header_len])
    count = math.prod(shape)
    expected = count * file_dtype.itemsize
    actual = len(buf) - header_len
    if actual < expected:
        raise DataError(
            f"{p}: truncated IDX data: shape {shape} needs {expected} bytes, "
            f"found {actual}; copy the file again"
        )
    if actual > expected:
        raise DataError(
            f"{p}: {actual - expected} unexpected trailing bytes after the IDX data "
            f"of shape {shape}; the file is corrupt or not IDX"
        )
    data = np.frombuffer(buf, dtype=file_dtype, count=count, offset=header_len)
    return data.reshape(shape).astype(file_dtype.newbyteorder("="))


def write_idx(path: str | Path, array: npt.ArrayLike, compress: bool = False) -> None:
    """Write ``array`` as an IDX file at ``path``, gzip-compressed if ``compress``.

    Raises:
        ConfigError: the dtype or shape cannot be stored in IDX.
    """
    arr = np.asarray(array)
    code = _KIND_TO_CODE.get(arr.dtype.str[1:])
    if code is None:
        raise ConfigError(
            f"cannot write dtype {arr.dtype} to IDX; supported are {_SUPPORTED}; "
            "convert the array with .astype() first"
        )
    if not 1 <= arr.ndim <= 255:
        raise ConfigError(f"IDX stores 1 to 255 dimensions, got an array with {arr.ndim}")
    if any(d >= 2**32 for d in arr.shape):
        raise ConfigError(f"IDX dimensions must be below 2**32, got shape {arr.shape}")
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + np.ascontiguousarray(arr, dtype=_CODE_TO_DTYPE[code]).tobytes()
    if compress:
        payload = gzip.compress(payload, mtime=0)
    Path(path).write_bytes(payload)


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; check the path") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"{path}: corrupt or truncated gzip data ({exc}); copy the file again"
        ) from exc
