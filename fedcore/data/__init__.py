"""Datasets for fedcore: the bundled MNIST, IDX files, partitioning and worker shards.

* :mod:`fedcore.data.idx` reads and writes IDX files (gzipped or raw).
* :mod:`fedcore.data.mnist` loads the bundled, checksummed MNIST copy.
* :mod:`fedcore.data.partition` splits labels into disjoint per-worker shards.
* :mod:`fedcore.data.shards` holds a worker's data in memory and as shard files.
* :mod:`fedcore.data.cli` is the ``fed-data`` command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedcore.data.idx import read_idx, write_idx
from fedcore.data.mnist import BUNDLED_MNIST_DIR, load_mnist, verify_checksums
from fedcore.data.partition import ShardSummary, format_summary, partition, summarize

if TYPE_CHECKING:
    from fedcore.data.shards import ArrayDataset, load_shard, save_shard

__all__ = [
    "BUNDLED_MNIST_DIR",
    "ArrayDataset",
    "ShardSummary",
    "format_summary",
    "load_mnist",
    "load_shard",
    "partition",
    "read_idx",
    "save_shard",
    "summarize",
    "verify_checksums",
    "write_idx",
]


_NEEDS_TORCH = {"ArrayDataset", "load_shard", "save_shard"}


def __getattr__(name: str) -> Any:
    # Shards are torch tensors: import torch (seconds) only when they are used, so that
    # commands which only read metadata (fed-query, fed-worker requests) start fast.
    if name in _NEEDS_TORCH:
        from fedcore.data import shards

        return getattr(shards, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
