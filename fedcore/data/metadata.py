"""Dataset metadata: the public description a data owner writes next to a shard.

A shard ``shards/shard-0.npz`` may carry ``shards/shard-0.meta.toml`` (an IDX directory:
``metadata.toml`` inside it)::

    name = "MNIST digits, silo A"
    description = "Handwritten digits scanned at site A, 2024"
    tags = ["#mnist", "#digits"]
    license = "CC-BY-SA-3.0"
    num-examples = 20000          # optional; checked against the shard

    [[features]]
    name = "image"
    dtype = "uint8"
    shape = [28, 28]
    description = "grey levels, 0 = background"

The worker advertises it in its hello so the coordinator can select workers by tag and list
who holds what. It describes the dataset as a whole, never a record; the only statistic
derived from the records, a label histogram, is released only with differential-privacy noise
and only when the worker's policy allows it (:mod:`fedcore.policy.release`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedcore.errors import ConfigError, DataError
from fedcore.toml_fields import StrictTable, read_toml
from fedcore.v1 import fedcore_pb2 as pb

__all__ = [
    "DatasetMetadata",
    "FeatureInfo",
    "LabelHistogram",
    "load_metadata",
    "metadata_path_for",
    "normalize_tag",
]

_TAG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_KEYS = ("name", "description", "tags", "license", "num-examples", "features")
_FEATURE_KEYS = ("name", "dtype", "shape", "description")


class _MetadataError(DataError, ConfigError):
    """A metadata file is invalid (a data error that reads like a config error)."""


def normalize_tag(tag: str) -> str:
    """``"#MNIST"`` -> ``"mnist"``; tags are lower case, 1-64 of letters, digits, ``._-``."""
    clean = tag.strip().removeprefix("#").lower()
    if not _TAG.match(clean):
        raise ConfigError(
            f"invalid tag {tag!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "optionally after a '#' (e.g. '#mnist')"
        )
    return clean


@dataclass(frozen=True)
class FeatureInfo:
    """One input feature: its name, element type and per-example shape."""

    name: str
    dtype: str = ""
    shape: tuple[int, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class LabelHistogram:
    """Per-label counts with Gaussian noise of standard deviation ``noise_std``; the release
    cost ``epsilon`` at ``delta`` by the worker's ledger."""

    counts: tuple[float, ...]
    noise_std: float
    epsilon: float
    delta: float


@dataclass(frozen=True)
class DatasetMetadata:
    """A dataset's public description (see the module docstring for the file format)."""

    name: str
    description: str = ""
    tags: tuple[str, ...] = ()
    license: str = ""
    num_examples: int = 0
    features: tuple[FeatureInfo, ...] = ()
    label_histogram: LabelHistogram | None = field(default=None, compare=False)

    def has_tags(self, required: tuple[str, ...]) -> bool:
        """Whether every tag of ``required`` (normalized) is among this dataset's tags."""
        return set(required) <= set(self.tags)

    def with_histogram(self, histogram: LabelHistogram | None) -> DatasetMetadata:
        return replace(self, label_histogram=histogram)

    def summary(self) -> str:
        """One line: ``'MNIST silo A' #mnist #digits, 400 examples, CC-BY-SA-3.0``."""
        parts = [repr(self.name)]
        if self.tags:
            parts.append(" ".join(f"#{t}" for t in self.tags))
        text = " ".join(parts) + f", {self.num_examples} examples"
        if self.license:
            text += f", {self.license}"
        if self.label_histogram is not None:
            text += ", noisy label histogram"
        return text

    def to_proto(self) -> pb.DatasetInfo:
        msg = pb.DatasetInfo(
            name=self.name,
            description=self.description,
            tags=list(self.tags),
            license=self.license,
            num_examples=self.num_examples,
            features=[
                pb.FeatureSpec(name=f.name, dtype=f.dtype, shape=f.shape, description=f.description)
                for f in self.features
            ],
        )
        if self.label_histogram is not None:
            h = self.label_histogram
            msg.label_histogram.CopyFrom(
                pb.LabelHistogram(
                    counts=h.counts, noise_std=h.noise_std, epsilon=h.epsilon, delta=h.delta
                )
            )
        return msg

    @classmethod
    def from_proto(cls, msg: pb.DatasetInfo) -> DatasetMetadata:
        """What a worker advertised; tags that are not valid are dropped, never matched."""
        tags: list[str] = []
        for tag in msg.tags:
            try:
                tags.append(normalize_tag(tag))
            except ConfigError:
                continue
        histogram = None
        if msg.HasField("label_histogram"):
            h = msg.label_histogram
            histogram = LabelHistogram(tuple(h.counts), h.noise_std, h.epsilon, h.delta)
        return cls(
            name=msg.name,
            description=msg.description,
            tags=tuple(tags),
            license=msg.license,
            num_examples=int(msg.num_examples),
            features=tuple(
                FeatureInfo(f.name, f.dtype, tuple(int(d) for d in f.shape), f.description)
                for f in msg.features
            ),
            label_histogram=histogram,
        )


def metadata_path_for(shard: Path) -> Path:
    """Where a shard's metadata file lives: ``x.npz`` -> ``x.meta.toml``; an IDX directory ->
    ``metadata.toml`` inside it."""
    if shard.is_dir():
        return shard / "metadata.toml"
    return shard.with_name(shard.name.removesuffix(".npz") + ".meta.toml")


def load_metadata(path: Path, *, num_examples: int | None = None) -> DatasetMetadata:
    """Read a metadata file; ``num_examples`` (the shard's size) fills or checks its count.

    Raises:
        DataError (also a ConfigError): unreadable, unknown keys, bad values, or a count that
            disagrees with the shard.
    """
    where = f"metadata file {path}"
    raw = StrictTable(
        read_toml(path, _MetadataError, "metadata file"), where, _KEYS, _MetadataError
    )
    name = raw.string("name")
    if not name:
        raise raw.fail("name", "is required: a short human-readable name of the dataset")
    tags = tuple(dict.fromkeys(_tag(raw, t) for t in raw.strings("tags") or ()))
    declared = raw.integer("num-examples", minimum=1)
    if declared is not None and num_examples is not None and declared != num_examples:
        raise _MetadataError(
            f"{where}: says num-examples = {declared}, but the shard holds {num_examples}; "
            "correct the file (or drop the key: the worker counts the shard itself)"
        )
    features = []
    for i, table in enumerate(raw.tables("features")):
        f = StrictTable(table, f"{where} [[features]] #{i + 1}", _FEATURE_KEYS, _MetadataError)
        fname = f.string("name")
        if not fname:
            raise f.fail("name", "is required")
        shape = f.integers("shape")
        features.append(
            FeatureInfo(
                fname, f.string("dtype") or "", tuple(shape or ()), f.string("description") or ""
            )
        )
    return DatasetMetadata(
        name=name,
        description=raw.string("description") or "",
        tags=tags,
        license=raw.string("license") or "",
        num_examples=num_examples if num_examples is not None else (declared or 0),
        features=tuple(features),
    )


def _tag(raw: StrictTable, tag: str) -> str:
    try:
        return normalize_tag(tag)
    except ConfigError as exc:
        raise raw.fail("tags", f"holds an invalid tag: {exc}") from None
