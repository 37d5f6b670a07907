"""The MNIST database, bundled with fedcore as its four canonical gzipped IDX files.

The bundled copy lives in ``fedcore/data/mnist/`` with a ``SHA256SUMS`` file; nothing is
ever downloaded. :func:`load_mnist` checks the checksums once per process and root.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from fedcore.data.idx import read_idx
from fedcore.errors import ConfigError, DataError

__all__ = ["BUNDLED_MNIST_DIR", "load_mnist", "verify_checksums"]

BUNDLED_MNIST_DIR: Path = Path(__file__).resolve().parent / "mnist"
"""Folder holding the bundled MNIST files and their ``SHA256SUMS``."""

_SUMS_NAME = "SHA256SUMS"
_PREFIX = {"train": "train", "test": "t10k"}
_verified_roots: set[Path] = set()
_verified_lock = threading.Lock()


def verify_checksums(root: Path = BUNDLED_MNIST_DIR) -> None:
    """Check every file listed in ``root/SHA256SUMS`` against its sha256 digest.

    Raises:
        DataError: ``SHA256SUMS`` is missing or malformed, a listed file is missing,
            or a digest does not match (the message names the file and both digests).
    """
    for name, expected in _read_sums(root).items():
        path = root / name
        if not path.is_file():
            raise DataError(
                f"{path}: listed in {root / _SUMS_NAME} but missing; "
                "restore the file from a clean checkout"
            )
        actual = _sha256(path)
        if actual != expected:
            raise DataError(
                f"{path}: checksum mismatch: expected sha256 {expected}, "
                f"got {actual}; the file is corrupt, restore it from a clean checkout"
            )


def load_mnist(
    split: Literal["train", "test"],
    root: Path | None = None,
    verify: bool = True,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Load an MNIST split as ``(x, y)``: uint8 images ``(N, 28, 28)`` and labels ``(N,)``.

    ``root`` defaults to the bundled copy; a user root may hold the ``.gz`` files or their
    uncompressed versions. With ``verify``, the root's ``SHA256SUMS`` is checked (once per
    process); it is required for the bundled copy and used when a user root has one.

    Raises:
        ConfigError: ``split`` is not ``"train"`` or ``"test"``.
        DataError: a file is missing, corrupt, or has the wrong shape or dtype.
    """
    if split not in _PREFIX:
        raise ConfigError(f"unknown MNIST split {split!r}; use 'train' or 'test'")
    base = BUNDLED_MNIST_DIR if root is None else Path(root)
    if verify and (root is None or (base / _SUMS_NAME).is_file()):
        _verify_once(base)
    prefix = _PREFIX[split]
    x = read_idx(_find(base, f"{prefix}-images-idx3-ubyte"))
    y = read_idx(_find(base, f"{prefix}-labels-idx1-ubyte"))
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DataError(
            f"{base}: MNIST {split} images must be uint8 (N, 28, 28), got {x.dtype} {x.shape}"
        )
    if y.dtype != np.uint8 or y.ndim != 1 or len(y) != len(x):
        raise DataError(
            f"{base}: MNIST {split} labels must be uint8 ({len(x)},) to match "
            f"the images, got {y.dtype} {y.shape}"
        )
    return x, y


def _verify_once(root: Path) -> None:
    key = root.resolve()
    with _verified_lock:
        if key in _verified_roots:
            return
    verify_checksums(root)
    with _verified_lock:
        _verified_roots.add(key)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"{root}: neither {stem}.gz nor {stem} found; point the root at a folder "
        "holding the four MNIST IDX files"
    )


def _read_sums(root: Path) -> dict[str, str]:
    sums_path = root / _SUMS_NAME
    try:
        text = sums_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(
            f"{sums_path}: cannot read checksum list ({exc.strerror}); "
            "restore it or point at a folder that has one"
        ) from exc
    sums: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        digest, _, name = line.partition(" ")
        name = name.strip().removeprefix("*")
        if len(digest) != 64 or not name:
            raise DataError(f"{sums_path}:{lineno}: expected '<sha256>  <file>', got {line!r}")
        sums[name] = digest.lower()
    if not sums:
        raise DataError(f"{sums_path}: lists no files; regenerate it with sha256sum")
    return sums


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
