"""A site's table: a CSV file with a header row, numeric cells and an integer label column.

Every column but the label is a feature, in the file's order. A cell that is empty or
reads `NA`, `N/A`, `NaN`, `null` or `?` (any case) is a missing value (NaN); the run
imputes it with the feature's mean across the sites when it standardises its features
(`fedml.data.features`), and refuses it otherwise. A missing label, a word where a
number belongs, an infinite value, or a row of the wrong length is one error naming the
file and line.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from fedml import regular_files
from fedml.data.shard import MAX_CLASSES, Shard
from fedml.errors import FedmlError

FLOAT32_MAX = float(np.finfo(np.float32).max)
MISSING = frozenset({"", "na", "n/a", "nan", "null", "?"})  # cells that mean "no value"


def read_csv_table(path: Path, label_column: str) -> Shard:
    """The examples of the CSV file at `path` (see the module doc)."""
    try:
        text = regular_files.read_text(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise FedmlError(f"Cannot read {path} as UTF-8 text: {exc}") from exc
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff")))  # Excel's byte-order mark
    header = next(reader, None)
    if not header:
        raise FedmlError(f"{path} is empty; a site CSV starts with a header row.")
    header = [name.strip() for name in header]
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise FedmlError(f"{path} names column(s) {', '.join(map(repr, twice))} more than once.")
    if label_column not in header:
        raise FedmlError(
            f"{path} has no column {label_column!r} (columns: {', '.join(header)}). Name the "
            "label column with --label-column."
        )
    label_at = header.index(label_column)
    if len(header) < 2:
        raise FedmlError(f"{path} has a label column but no feature columns.")
    features, labels = [], []
    for line, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise FedmlError(
                f"{path}, line {line}: {len(row)} cells where the header has {len(header)}."
            )
        values = [_value(path, line, header[i], cell) for i, cell in enumerate(row)]
        label = values.pop(label_at)
        if math.isnan(label):
            raise FedmlError(
                f"{path}, line {line}: the label is missing; drop the row or give it its label."
            )
        if not label.is_integer() or not 0 <= label < MAX_CLASSES:
            raise FedmlError(
                f"{path}, line {line}: label {row[label_at]!r} is not a class index "
                f"0 .. {MAX_CLASSES - 1:,}."
            )
        features.append(values)
        labels.append(int(label))
    if not labels:
        raise FedmlError(f"{path} has a header but no examples.")
    return Shard(np.asarray(features, dtype=np.float32), np.asarray(labels, dtype=np.int64))


def csv_header(path: Path, label_column: str) -> tuple[str, ...]:
    """The feature columns' names of a site CSV (its header without the label column)."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle), [])
    return tuple(name.strip() for name in header if name.strip() != label_column)


def _value(path: Path, line: int, column: str, cell: str) -> float:
    """One cell as a number, NaN when it is a missing value."""
    text = cell.strip()
    if text.lower() in MISSING:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise FedmlError(
            f"{path}, line {line}: {cell!r} (column {column!r}) is not a number. Site CSVs "
            "hold numeric cells only (encode categories as numbers first); a missing value "
            "is an empty cell or NA."
        ) from None
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise FedmlError(
            f"{path}, line {line}: {cell!r} (column {column!r}) is not a finite number a "
            "float32 can hold; clean it first."
        )
    return value
