"""A worker's local data: an in-memory dataset, and reading/writing it as a shard file.

A shard is either a ``.npz`` file holding arrays ``x`` and ``y`` (what ``fed-data split``
writes), or a directory holding an MNIST-style IDX pair of images and labels.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset

from fedcore.data.idx import read_idx
from fedcore.errors import DataError

__all__ = ["ArrayDataset", "load_shard", "save_shard"]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class ArrayDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Examples held in memory as tensors ``x`` (float32) and ``y`` (int64).

    uint8 images of shape ``(N, 28, 28)`` or ``(N, 1, 28, 28)`` are scaled to [0, 1], then
    standardized with the MNIST mean and std and shaped ``(N, 1, 28, 28)``; other uint8
    inputs are only scaled to [0, 1]; float inputs are kept as they are.

    Raises:
        DataError: lengths differ, there are no examples, labels are not integers >= 0,
            or ``x`` holds NaN or infinite values. ``source`` names the data in messages.
    """

    def __init__(self, x: npt.ArrayLike, y: npt.ArrayLike, *, source: str = "arrays") -> None:
        xa, ya = np.asarray(x), np.asarray(y)
        _validate(xa, ya, source)
        self.source = source
        self.x: torch.Tensor = torch.from_numpy(_to_float32(xa))
        self.y: torch.Tensor = torch.from_numpy(ya.astype(np.int64))

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


def load_shard(path: str | Path) -> ArrayDataset:
    """Load a shard from a ``.npz`` file (arrays ``x``, ``y``) or an IDX directory.

    In a directory, images and labels are the files whose names contain ``images`` and
    ``labels`` (gzipped or raw). If there are several pairs, the ``train`` pair wins.

    Raises:
        DataError: the path is missing, unreadable, ambiguous, or holds invalid data.
    """
    p = Path(path)
    if p.is_dir():
        images, labels = _find_idx_pair(p)
        return ArrayDataset(read_idx(images), read_idx(labels), source=str(p))
    if p.is_file():
        x, y = _read_npz(p)
        return ArrayDataset(x, y, source=str(p))
    raise DataError(
        f"{p}: no such shard file or directory; create shards with "
        "'fed-data split --out DIR --num-shards N'"
    )


def save_shard(path: str | Path, x: npt.ArrayLike, y: npt.ArrayLike) -> Path:
    """Validate ``x`` and ``y`` and write them to a ``.npz`` file; return the path written.

    ``.npz`` is appended to the name if missing, and parent directories are created.
    """
    p = Path(path)
    if p.suffix != ".npz":
        p = p.with_name(p.name + ".npz")
    xa, ya = np.asarray(x), np.asarray(y)
    _validate(xa, ya, str(p))
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("wb") as f:
            np.savez(f, x=xa, y=ya)
    except OSError as exc:
        raise DataError(
            f"{p}: cannot write shard ({exc.strerror}); check that the directory "
            "is writable and the disk is not full"
        ) from exc
    return p


def _validate(x: npt.NDArray[Any], y: npt.NDArray[Any], source: str) -> None:
    if x.ndim < 1 or y.ndim != 1:
        raise DataError(
            f"{source}: x must have a leading example axis and y must be 1-D, "
            f"got x {x.shape} and y {y.shape}"
        )
    if len(x) != len(y):
        raise DataError(
            f"{source}: x has {len(x)} examples but y has {len(y)} labels; "
            "they must match one to one"
        )
    if len(y) == 0:
        raise DataError(f"{source}: holds no examples; a shard needs at least one")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"{source}: x must be numeric, got dtype {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source}: labels must be integers, got dtype {y.dtype}")
    if y.min() < 0:
        raise DataError(f"{source}: labels must be >= 0, found {y.min()}")
    if np.issubdtype(x.dtype, np.inexact) and not np.isfinite(x).all():
        raise DataError(f"{source}: x holds NaN or infinite values; fix or drop those examples")


def _to_float32(x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    if x.dtype != np.uint8:
        return np.ascontiguousarray(x, dtype=np.float32)
    scaled = x.astype(np.float32) / np.float32(255.0)
    if x.shape[1:] in ((28, 28), (1, 28, 28)):
        scaled = (scaled - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)
        return np.ascontiguousarray(scaled.reshape(len(x), 1, 28, 28))
    return scaled


def _read_npz(path: Path) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise DataError(
                    f"{path}: is a single .npy array, expected a .npz file with arrays 'x' and 'y'"
                )
            missing = [k for k in ("x", "y") if k not in npz.files]
            if missing:
                raise DataError(
                    f"{path}: missing array(s) {', '.join(missing)}; a shard "
                    f"needs 'x' and 'y' (found {', '.join(npz.files) or 'none'})"
                )
            return npz["x"], npz["y"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"{path}: not a readable .npz shard ({exc}); write shards with "
            "'fed-data split' or fedcore.data.save_shard"
        ) from exc


def _find_idx_pair(root: Path) -> tuple[Path, Path]:
    """Pick the images/labels pair in ``root``, keyed by the name before images/labels."""
    pairs: dict[str, dict[str, list[Path]]] = {}
    for f in sorted(root.iterdir()):
        if not f.is_file():
            continue
        name = f.name.lower()
        for kind in ("images", "labels"):
            if kind in name:
                prefix = name.split(kind, 1)[0]
                pairs.setdefault(prefix, {"images": [], "labels": []})[kind].append(f)
                break
    complete = {k: v for k, v in pairs.items() if v["images"] and v["labels"]}
    if not complete:
        raise DataError(
            f"{root}: no IDX pair found; the directory needs one file whose name "
            "contains 'images' and one whose name contains 'labels'"
        )
    if len(complete) > 1:
        train = {k: v for k, v in complete.items() if "train" in k}
        if len(train) != 1:
            names = ", ".join(f.name for v in complete.values() for f in v["images"])
            raise DataError(
                f"{root}: several IDX pairs ({names}) and no single 'train' pair "
                "to prefer; keep one pair in the directory"
            )
        complete = train
    (group,) = complete.values()
    return _pick(root, group["images"]), _pick(root, group["labels"])


def _pick(root: Path, files: list[Path]) -> Path:
    """One file, or a file and its gzipped twin (the ``.gz`` wins)."""
    if len(files) == 1:
        return files[0]
    stems = {f.name.removesuffix(".gz") for f in files}
    if len(stems) == 1:
        return next(f for f in files if f.name.endswith(".gz"))
    raise DataError(
        f"{root}: ambiguous IDX files {', '.join(f.name for f in files)}; keep one of them"
    )
