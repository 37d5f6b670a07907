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

A table (a CSV or Parquet shard, :mod:`fedcore.data.table`) describes every column as a
feature, with the public facts differential privacy needs: the bounds of a numeric column
(values are clamped to them; they set a query's sensitivity) and the categories of a
categorical one. A ``mock`` file (same schema, made-up rows) may be attached for data
scientists to develop their queries on; the real rows never leave::

    name = "Diabetes, hospital A"
    tags = ["#diabetes"]
    mock = "hospital-a.mock.csv"  # relative to this file

    [[features]]
    name = "bmi"
    dtype = "float64"
    minimum = 15.0
    maximum = 50.0

    [[features]]
    name = "sex"
    dtype = "category"
    categories = ["F", "M"]

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
    "CATEGORY",
    "DatasetMetadata",
    "FeatureInfo",
    "LabelHistogram",
    "load_metadata",
    "metadata_path_for",
    "normalize_tag",
]

_TAG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_KEYS = ("name", "description", "tags", "license", "num-examples", "features", "mock")
_FEATURE_KEYS = ("name", "dtype", "shape", "description", "minimum", "maximum", "categories")
#: The dtype of a categorical column (its values are strings among ``categories``).
CATEGORY = "category"


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
    """One input feature (or table column): its name, element type and per-example shape;
    for a numeric column its public bounds, for a categorical one its public categories."""

    name: str
    dtype: str = ""
    shape: tuple[int, ...] = ()
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None
    categories: tuple[str, ...] = ()

    @property
    def is_categorical(self) -> bool:
        return self.dtype == CATEGORY

    @property
    def bounds(self) -> tuple[float, float] | None:
        """``(minimum, maximum)`` when both are declared."""
        if self.minimum is None or self.maximum is None:
            return None
        return self.minimum, self.maximum

    def to_proto(self) -> pb.FeatureSpec:
        msg = pb.FeatureSpec(
            name=self.name,
            dtype=self.dtype,
            shape=self.shape,
            description=self.description,
            categories=self.categories,
        )
        if self.minimum is not None:
            msg.minimum = self.minimum
        if self.maximum is not None:
            msg.maximum = self.maximum
        return msg

    @classmethod
    def from_proto(cls, f: pb.FeatureSpec) -> FeatureInfo:
        return cls(
            f.name,
            f.dtype,
            tuple(int(d) for d in f.shape),
            f.description,
            f.minimum if f.HasField("minimum") else None,
            f.maximum if f.HasField("maximum") else None,
            tuple(f.categories),
        )


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
    #: The owner's mock file (made-up rows, same schema), as its path on the worker ...
    mock: Path | None = field(default=None, compare=False)
    #: ... and as CSV text, once loaded (what the hello carries).
    mock_csv: str = field(default="", compare=False)

    def feature(self, name: str) -> FeatureInfo | None:
        """The feature (column) called ``name``, if any."""
        return next((f for f in self.features if f.name == name), None)

    def has_tags(self, required: tuple[str, ...]) -> bool:
        """Whether every tag of ``required`` (normalized) is among this dataset's tags."""
        return set(required) <= set(self.tags)

    def with_histogram(self, histogram: LabelHistogram | None) -> DatasetMetadata:
        return replace(self, label_histogram=histogram)

    def with_mock_csv(self, csv: str) -> DatasetMetadata:
        return replace(self, mock_csv=csv)

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
            features=[f.to_proto() for f in self.features],
            mock_csv=self.mock_csv,
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
            features=tuple(FeatureInfo.from_proto(f) for f in msg.features),
            label_histogram=histogram,
            mock_csv=msg.mock_csv,
        )


def metadata_path_for(shard: Path) -> Path:
    """Where a shard's metadata file lives: ``x.npz`` (or a table ``x.csv``, ``x.parquet``)
    -> ``x.meta.toml``; an IDX directory ->
    ``metadata.toml`` inside it."""
    if shard.is_dir():
        return shard / "metadata.toml"
    stem = shard.name
    for suffix in (".npz", ".csv", ".parquet", ".pq"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return shard.with_name(stem + ".meta.toml")


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
    features: list[FeatureInfo] = []
    for i, table in enumerate(raw.tables("features")):
        f = StrictTable(table, f"{where} [[features]] #{i + 1}", _FEATURE_KEYS, _MetadataError)
        fname = f.string("name")
        if not fname:
            raise f.fail("name", "is required")
        shape = f.integers("shape")
        feature = FeatureInfo(
            fname,
            f.string("dtype") or "",
            tuple(shape or ()),
            f.string("description") or "",
            f.number("minimum"),
            f.number("maximum"),
            tuple(dict.fromkeys(f.strings("categories") or ())),
        )
        _check_column(f, feature)
        if any(other.name == fname for other in features):
            raise f.fail("name", f"repeats the feature {fname!r}; names must be unique")
        features.append(feature)
    mock = raw.string("mock")
    return DatasetMetadata(
        name=name,
        description=raw.string("description") or "",
        tags=tags,
        license=raw.string("license") or "",
        num_examples=num_examples if num_examples is not None else (declared or 0),
        features=tuple(features),
        mock=(path.parent / mock) if mock else None,
    )


def _check_column(table: StrictTable, f: FeatureInfo) -> None:
    """Bounds come in pairs with minimum < maximum; categories only on categorical columns."""
    if (f.minimum is None) != (f.maximum is None):
        raise table.fail(
            "minimum" if f.minimum is None else "maximum",
            "is required with the other bound: a column's public bounds come as a pair",
        )
    if f.minimum is not None and f.maximum is not None and not f.minimum < f.maximum:
        raise table.fail("maximum", f"must be above minimum ({f.minimum:g}), got {f.maximum:g}")
    if f.is_categorical:
        if not f.categories:
            raise table.fail(
                "categories", 'is required for a "category" column: its public list of values'
            )
        if f.minimum is not None:
            raise table.fail("minimum", 'makes no sense on a "category" column')
    elif f.categories:
        raise table.fail("categories", 'is only for columns of dtype "category"')


def _tag(raw: StrictTable, tag: str) -> str:
    try:
        return normalize_tag(tag)
    except ConfigError as exc:
        raise raw.fail("tags", f"holds an invalid tag: {exc}") from None
