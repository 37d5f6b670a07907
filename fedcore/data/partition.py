"""Split a labelled dataset into disjoint shards, one per federated worker.

Three schemes, all deterministic for a given seed:

* ``iid``: a random permutation cut into near-equal parts.
* ``dirichlet``: per class, proportions over shards drawn from ``Dir(alpha)``; small
  ``alpha`` gives skewed, non-IID shards.
* ``shards``: the pathological split of McMahan et al. (2017): sort by label, cut into
  ``num_shards * classes_per_shard`` pieces, give each shard ``classes_per_shard`` random
  pieces. Pieces never straddle two classes, so a shard holds at most that many classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fedcore.errors import ConfigError

__all__ = ["ShardSummary", "format_summary", "partition", "summarize"]

Scheme = Literal["iid", "dirichlet", "shards"]
IndexArray = npt.NDArray[np.int64]

_MAX_DIRICHLET_ATTEMPTS = 100


@dataclass(frozen=True, slots=True)
class ShardSummary:
    """Size and per-class example counts of one shard."""

    index: int
    num_examples: int
    class_counts: list[int]


def partition(
    labels: npt.NDArray[Any],
    num_shards: int,
    scheme: Scheme,
    *,
    seed: int,
    alpha: float = 0.5,
    classes_per_shard: int = 2,
) -> list[IndexArray]:
    """Split example indices into ``num_shards`` disjoint, non-empty, sorted int64 arrays.

    Every index ``0 .. len(labels) - 1`` appears in exactly one shard.

    Raises:
        ConfigError: bad arguments, or a split that cannot give every shard an example.
    """
    y = _check_labels(labels)
    if num_shards < 1:
        raise ConfigError(f"num_shards must be at least 1, got {num_shards}")
    if num_shards > len(y):
        raise ConfigError(
            f"cannot split {len(y)} examples into {num_shards} non-empty shards; "
            "lower num_shards or use more examples"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(len(y)), num_shards)
    elif scheme == "dirichlet":
        parts = _dirichlet(y, num_shards, alpha, rng)
    elif scheme == "shards":
        parts = _pathological(y, num_shards, classes_per_shard, rng)
    else:
        raise ConfigError(f"unknown partition scheme {scheme!r}; use iid, dirichlet or shards")
    return [np.sort(p).astype(np.int64) for p in parts]


def summarize(labels: npt.NDArray[Any], parts: list[IndexArray]) -> list[ShardSummary]:
    """Count examples and examples per class (``0 .. max label``) in each shard."""
    y = _check_labels(labels)
    num_classes = int(y.max()) + 1
    return [
        ShardSummary(
            index=i,
            num_examples=len(p),
            class_counts=[int(c) for c in np.bincount(y[p], minlength=num_classes)],
        )
        for i, p in enumerate(parts)
    ]


def format_summary(summaries: list[ShardSummary]) -> str:
    """Render summaries as a fixed-width table: shard, examples, then one column per class."""
    num_classes = max((len(s.class_counts) for s in summaries), default=0)
    totals = [0] * num_classes
    for s in summaries:
        for c, n in enumerate(s.class_counts):
            totals[c] += n
    total = sum(s.num_examples for s in summaries)
    width = max(len(str(n)) for n in [*totals, num_classes - 1, 0])
    ex_width = max(len("examples"), len(str(total)))

    def row(first: str, examples: str, cells: list[str]) -> str:
        cols = " ".join(cell.rjust(width) for cell in cells)
        return f"{first.rjust(5)}  {examples.rjust(ex_width)}  {cols}".rstrip()

    header = row("shard", "examples", [str(c) for c in range(num_classes)])
    lines = [header, "-" * len(header)]
    for s in summaries:
        counts = s.class_counts + [0] * (num_classes - len(s.class_counts))
        lines.append(row(str(s.index), str(s.num_examples), [str(n) for n in counts]))
    lines.append("-" * len(header))
    lines.append(row("total", str(total), [str(n) for n in totals]))
    return "\n".join(lines)


def _check_labels(labels: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) == 0:
        raise ConfigError("labels is empty; there is nothing to partition")
    if y.min() < 0:
        raise ConfigError(f"labels must be >= 0, found {y.min()}")
    return y.astype(np.int64)


def _dirichlet(
    y: npt.NDArray[np.int64], num_shards: int, alpha: float, rng: np.random.Generator
) -> list[IndexArray]:
    if not alpha > 0:
        raise ConfigError(f"dirichlet alpha must be > 0, got {alpha}")
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(_MAX_DIRICHLET_ATTEMPTS):
        buckets: list[list[IndexArray]] = [[] for _ in range(num_shards)]
        for idx in by_class:
            idx = rng.permutation(idx)
            props = rng.dirichlet(np.full(num_shards, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for shard, piece in enumerate(np.split(idx, cuts)):
                buckets[shard].append(piece)
        parts = [np.concatenate(b) for b in buckets]
        if all(len(p) > 0 for p in parts):
            return parts
    raise ConfigError(
        f"dirichlet split with alpha={alpha} left a shard empty in each of "
        f"{_MAX_DIRICHLET_ATTEMPTS} draws; raise alpha, lower num_shards "
        "or use more examples"
    )


def _pathological(
    y: npt.NDArray[np.int64], num_shards: int, classes_per_shard: int, rng: np.random.Generator
) -> list[IndexArray]:
    if classes_per_shard < 1:
        raise ConfigError(f"classes_per_shard must be at least 1, got {classes_per_shard}")
    num_pieces = num_shards * classes_per_shard
    classes, sizes = np.unique(y, return_counts=True)
    if num_pieces < len(classes):
        raise ConfigError(
            f"the 'shards' scheme gives each shard at most {classes_per_shard} classes, so "
            f"num_shards * classes_per_shard ({num_pieces}) must be at least the number of "
            f"classes ({len(classes)}); raise num_shards or classes_per_shard"
        )
    if num_pieces > len(y):
        raise ConfigError(
            f"cannot cut {len(y)} examples into {num_pieces} non-empty pieces; "
            "lower num_shards or classes_per_shard"
        )
    pieces: list[IndexArray] = []
    for c, k in zip(classes, _pieces_per_class(sizes, num_pieces), strict=True):
        pieces.extend(np.array_split(rng.permutation(np.flatnonzero(y == c)), k))
    order = rng.permutation(num_pieces).reshape(num_shards, classes_per_shard)
    return [np.concatenate([pieces[i] for i in row]) for row in order]


def _pieces_per_class(sizes: npt.NDArray[np.int64], num_pieces: int) -> list[int]:
    """Share ``num_pieces`` among classes in proportion to size, at least one each."""
    total = int(sizes.sum())
    counts = [max(1, num_pieces * int(n) // total) for n in sizes]
    while sum(counts) < num_pieces:  # give a piece to the class with the biggest pieces
        i = max(
            (j for j in range(len(sizes)) if counts[j] < sizes[j]),
            key=lambda j: sizes[j] / counts[j],
        )
        counts[i] += 1
    while sum(counts) > num_pieces:  # take one from the class with the smallest pieces
        i = min((j for j in range(len(sizes)) if counts[j] > 1), key=lambda j: sizes[j] / counts[j])
        counts[i] -= 1
    return counts
