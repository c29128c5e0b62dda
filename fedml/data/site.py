"""A data site's private shard: read once from the file the site points to, then kept
as memory-mapped arrays that every ClientApp process opens without parsing.

Flower runs each message to a SuperNode in a fresh `flwr-clientapp` process, so a
ClientApp that parsed a CSV (or decompressed an `.npz`) would pay for it every round.
`fedml client` calls `prepare_site` once at start-up: it reads and checks the data and
writes `x.npy`/`y.npy` into the site's state folder (atomically, and again only when the
source file changes); the ClientApp then calls `load_prepared`, which maps them.

Accepted sources:
- an `.npz` file holding `x` (features, one row per example) and `y` (integer labels);
- a folder of such `.npz` files (concatenated in name order);
- a `.csv` file with a header row, numeric cells (an empty, `NA`, `NaN` or `?` cell is a
  missing value), and an integer label column (`label` unless told otherwise); every
  other column is a feature (`fedml.data.tables`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from fedml.data.datasets import Shard, read_shard
from fedml.data.tables import read_csv_table
from fedml.errors import FedmlError
from fedml.runstore import atomic_write

X_FILE, Y_FILE, SOURCE_FILE = "x.npy", "y.npy", "source.json"
DEFAULT_LABEL_COLUMN = "label"


def read_site_data(path: Path, label_column: str = DEFAULT_LABEL_COLUMN) -> Shard:
    """The examples at `path` (see the module doc), checked; a clear error otherwise."""
    if not path.exists():
        raise FedmlError(
            f"Site data {path} does not exist. Pass --data with an .npz file, a folder of "
            ".npz files, or a .csv file with a label column."
        )
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise FedmlError(f"{path} holds no .npz files; a site folder holds x/y .npz shards.")
        shards = [read_shard(f) for f in files]
        shapes = {s.x.shape[1:] for s in shards}
        if len(shapes) != 1:
            raise FedmlError(f"{path}: the .npz files disagree on the feature shape: {shapes}.")
        return Shard.concat(shards)
    if path.suffix == ".npz":
        return read_shard(path)
    if path.suffix == ".csv":
        return read_csv_table(path, label_column)
    raise FedmlError(
        f"{path} is neither an .npz file, a folder of them, nor a .csv file; convert the "
        "site's data to one of these."
    )


def prepare_site(
    source: Path, folder: Path, label_column: str = DEFAULT_LABEL_COLUMN
) -> tuple[Path, Shard]:
    """Make `folder` hold `source`'s examples as `.npy` files (unless it already holds
    this version of them). Returns the folder and the examples (memory-mapped)."""
    stamp = _source_stamp(source, label_column)
    stamp_path = folder / SOURCE_FILE
    if stamp_path.is_file() and (folder / X_FILE).is_file() and (folder / Y_FILE).is_file():
        try:
            if json.loads(stamp_path.read_text(encoding="utf-8")) == stamp:
                return folder, load_prepared(folder)
        except ValueError:
            pass  # a damaged stamp: prepare again
    shard = read_site_data(source, label_column)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in ((X_FILE, shard.x), (Y_FILE, shard.y)):
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        atomic_write(folder / name, buffer.getvalue())
    atomic_write(stamp_path, json.dumps(stamp, sort_keys=True).encode())
    return folder, load_prepared(folder)


def _source_stamp(source: Path, label_column: str) -> dict:
    """What identifies a version of the source: its path, and each file's size and
    modification time (a changed file is prepared again)."""
    resolved = source.resolve()
    files = sorted(resolved.glob("*.npz")) if resolved.is_dir() else [resolved]
    return {
        "source": str(resolved),
        "label_column": label_column,
        "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()],
    }


def load_prepared(folder: Path) -> Shard:
    """The prepared examples in `folder`, memory-mapped (read-only, no parsing)."""
    try:
        x = np.load(folder / X_FILE, mmap_mode="r", allow_pickle=False)
        y = np.load(folder / Y_FILE, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise FedmlError(
            f"{folder} does not hold prepared site data ({exc}). Restart `fedml client`, "
            "which prepares it from --data."
        ) from exc
    if x.dtype != np.float32 or y.dtype != np.int64 or len(x) != len(y) or x.ndim < 2:
        raise FedmlError(f"{folder} holds damaged prepared data; restart `fedml client`.")
    return Shard(x, y)
