"""Who the virtual clients are and what data each holds: a plain, JSON-able description.

Every host process (or Ray actor) receives a :class:`HostSpec` and rebuilds its clients'
shards itself from the same data source and the same seeded :func:`fedcore.data.partition`
call that ``fed-data split`` makes, so no data crosses between processes and a client's shard
is the same on every engine. The source is kept once per host as uint8 images; a client
holds only its index array until it trains (see :mod:`.trainer`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fedcore.data import ArrayDataset, load_mnist, partition
from fedcore.errors import ConfigError

__all__ = [
    "DataSpec",
    "HostSpec",
    "WorkerSettings",
    "client_name",
    "client_shards",
    "load_source",
    "shard_dataset",
]

Scheme = Literal["iid", "dirichlet", "shards"]


@dataclass(frozen=True)
class DataSpec:
    """The training data and how it is split among ``num_clients`` virtual clients.

    ``source`` is an ``.npz`` file (arrays ``x``, ``y``), a directory of MNIST IDX files (as
    ``fed-data split --source``), or None for the bundled MNIST training set; ``max_examples`` keeps only the first examples.
    """

    num_clients: int
    source: str | None = None
    max_examples: int | None = None
    scheme: Scheme = "iid"
    seed: int = 0
    alpha: float = 0.5
    classes_per_shard: int = 2

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ConfigError(f"--num-clients must be at least 1, got {self.num_clients}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"--num-examples must be at least 1, got {self.max_examples}")

    def check_source(self) -> None:
        """Fail now, with the flag's name, if the data source is missing (not in every host)."""
        if self.source is not None and not Path(self.source).exists():
            raise ConfigError(f"--data {self.source}: no such file or directory")


@dataclass(frozen=True)
class WorkerSettings:
    """What ``fed-worker`` would be told, the same for every virtual worker."""

    device: str = "cpu"
    threads: int = 1
    dpsgd_noise_multiplier: float | None = None
    dpsgd_clip: float = 1.0
    dpsgd_delta: float = 1e-5
    dpsgd_max_epsilon: float | None = None
    policy: str | None = None
    #: Each virtual worker keeps its privacy ledger here as ``NAME.json`` (with --policy).
    ledger_dir: str | None = None
    give_up_after: float = 120.0


@dataclass(frozen=True)
class HostSpec:
    """One host process's share of the simulation: which clients, and where to connect."""

    server: str
    data: DataSpec
    clients: tuple[int, ...]
    workers: WorkerSettings = field(default_factory=WorkerSettings)
    #: Virtual workers of this host that train (or evaluate) at the same time.
    concurrency: int = 1
    log_level: str = "WARNING"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> HostSpec:
        raw: dict[str, Any] = json.loads(text)
        return cls(
            server=str(raw["server"]),
            data=DataSpec(**raw["data"]),
            clients=tuple(int(i) for i in raw["clients"]),
            workers=WorkerSettings(**raw["workers"]),
            concurrency=int(raw["concurrency"]),
            log_level=str(raw["log_level"]),
        )


def client_name(index: int, num_clients: int) -> str:
    """The worker name of client ``index``: zero-padded, so names sort like indices."""
    return f"client-{index:0{len(str(num_clients - 1))}d}"


def load_source(spec: DataSpec) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
    """The raw examples and labels the clients share (uint8 images stay uint8)."""
    if spec.source is None:
        x, y = load_mnist("train")
    else:
        path = Path(spec.source)
        if path.is_dir():  # MNIST's IDX files, as fed-data split --source reads them
            x, y = load_mnist("train", root=path)
        elif path.is_file():
            with np.load(path, allow_pickle=False) as npz:
                if "x" not in npz or "y" not in npz:
                    raise ConfigError(f"{path}: an .npz source needs arrays x and y")
                x, y = npz["x"], npz["y"]
        else:
            raise ConfigError(f"--data {path}: no such file or directory")
    if spec.max_examples is not None:
        x, y = x[: spec.max_examples], y[: spec.max_examples]
    return x, np.asarray(y).astype(np.int64)


def client_shards(spec: DataSpec, labels: npt.NDArray[np.int64]) -> list[npt.NDArray[np.int64]]:
    """Every client's example indices: ``fed-data split``'s partition, same seed, same shards."""
    return partition(
        labels,
        spec.num_clients,
        spec.scheme,
        seed=spec.seed,
        alpha=spec.alpha,
        classes_per_shard=spec.classes_per_shard,
    )


def shard_dataset(
    x: npt.NDArray[Any], y: npt.NDArray[np.int64], indices: npt.NDArray[np.int64]
) -> ArrayDataset:
    """A client's shard as ``fed-worker`` would load it from the ``.npz`` file ``fed-data``
    writes (same conversion from uint8, so the same tensors)."""
    return ArrayDataset(x[indices], y[indices], source="simulated shard")
