"""Tabular shards: a CSV or Parquet file read with pyarrow, checked against its metadata.

Only the columns the metadata declares are loaded (an undeclared column can never be
queried); numeric columns become float64 arrays, categorical columns (dtype ``"category"``)
string arrays whose values must be among the declared categories. Missing values are refused
at load time, so a query never has to guess what a null means.

A table is the federated-analytics counterpart of an ``.npz`` training shard: its rows stay
on the worker, which answers aggregate queries over them (:mod:`fedcore.analytics`).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedcore.data.metadata import FeatureInfo
from fedcore.errors import DataError

__all__ = ["MOCK_MAX_BYTES", "TABLE_SUFFIXES", "Table", "is_table_path", "load_table", "mock_csv"]

#: File name suffixes read as tables.
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
#: The largest mock a worker advertises (it travels in the hello).
MOCK_MAX_BYTES = 256 * 1024


def is_table_path(path: Path) -> bool:
    """Whether ``path`` names a tabular shard (by its suffix)."""
    return path.suffix.lower() in TABLE_SUFFIXES


@dataclass(frozen=True)
class Table:
    """The declared columns of a table, as numpy arrays of one length."""

    columns: Mapping[str, npt.NDArray[Any]]
    num_rows: int
    source: str = "table"

    def column(self, name: str) -> npt.NDArray[Any]:
        try:
            return self.columns[name]
        except KeyError:
            raise DataError(f"{self.source}: no column {name!r}") from None


def _read(path: Path, schema: Sequence[FeatureInfo]) -> Any:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    wanted = [f.name for f in schema]
    try:
        if path.suffix.lower() == ".csv":
            # Categories are read as text even when they look like numbers ("0", "1"); a
            # missing column comes back typed null, and is reported by load_table.
            types = {f.name: pa.string() for f in schema if f.is_categorical}
            return pacsv.read_csv(
                path,
                convert_options=pacsv.ConvertOptions(
                    column_types=types, include_columns=wanted, include_missing_columns=True
                ),
            )
        return pq.read_table(path, columns=wanted)
    except FileNotFoundError:
        raise DataError(f"{path}: no such table file") from None
    except (pa.ArrowException, OSError, KeyError) as exc:
        raise DataError(
            f"{path}: cannot read the table ({exc}); check that it is a valid "
            f"{'CSV' if path.suffix.lower() == '.csv' else 'Parquet'} file whose columns "
            "match its metadata"
        ) from None


def load_table(path: str | Path, schema: Sequence[FeatureInfo]) -> Table:
    """Read the columns ``schema`` declares from a CSV or Parquet file.

    Raises:
        DataError: unreadable, a declared column missing, a null, a non-numeric value in a
            numeric column, or a category the metadata does not list.
    """
    p = Path(path)
    if not schema:
        raise DataError(
            f"{p}: a table needs a metadata file with one [[features]] entry per column "
            "(name, dtype, and minimum/maximum or categories)"
        )
    arrow = _read(p, schema)
    columns: dict[str, npt.NDArray[Any]] = {}
    for feature in schema:
        if feature.name not in arrow.column_names or _is_null_type(arrow, feature.name):
            raise DataError(
                f"{p}: has no column {feature.name!r}, which its metadata declares "
                f"(columns: {', '.join(arrow.column_names) or 'none'})"
            )
        columns[feature.name] = _convert(p, feature, arrow.column(feature.name))
    if arrow.num_rows == 0:
        raise DataError(f"{p}: holds no rows")
    return Table(columns, int(arrow.num_rows), str(p))


def _is_null_type(arrow: Any, name: str) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_null(arrow.schema.field(name).type))


def _convert(path: Path, feature: FeatureInfo, column: Any) -> npt.NDArray[Any]:
    import pyarrow as pa
    import pyarrow.compute as pc

    where = f"{path}: column {feature.name!r}"
    if column.null_count:
        raise DataError(f"{where} has {column.null_count} missing value(s); fill or drop them")
    if feature.is_categorical:
        values = np.asarray(pc.cast(column, pa.string()).to_pylist(), dtype=str)
        unknown = sorted(set(values.tolist()) - set(feature.categories))
        if unknown:
            raise DataError(
                f"{where} holds value(s) {', '.join(map(repr, unknown[:5]))} outside its "
                f"declared categories ({', '.join(feature.categories)}); add them to the "
                "metadata or fix the data"
            )
        return values
    try:
        numbers = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowException:
        raise DataError(
            f'{where} is not numeric ({column.type}); declare it dtype = "category" '
            "with its categories, or fix the data"
        ) from None
    array = np.ascontiguousarray(numbers, dtype=np.float64)
    if not np.isfinite(array).all():
        raise DataError(f"{where} holds NaN or infinite values; fix or drop those rows")
    return array


def mock_csv(path: str | Path, schema: Sequence[FeatureInfo]) -> str:
    """The owner's mock file as CSV text, checked against the same schema as the real table.

    Raises:
        DataError: unreadable, not matching the schema, or larger than ``MOCK_MAX_BYTES``.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    table = load_table(path, schema)
    arrow = pa.table({name: table.columns[name] for name in (f.name for f in schema)})
    sink = io.BytesIO()
    pacsv.write_csv(arrow, sink)
    data = sink.getvalue()
    if len(data) > MOCK_MAX_BYTES:
        raise DataError(
            f"{path}: the mock is {len(data)} bytes as CSV, above {MOCK_MAX_BYTES}; a mock "
            "needs only a few made-up rows"
        )
    return data.decode("utf-8")
