"""A built-in dataset's split as site files: what `fedml data split` writes.

As `.npz` (the default): each client's shard becomes `client-<i>.npz` and the server's
test set `test.npz`, both holding `x` (float32 features, preprocessed exactly as `fedml
simulate` preprocesses the dataset) and `y` (int64 labels). A site passes its file to
`fedml client --data`, the server the folder to `--dataset npz:DIR` (it reads `test.npz`
only), and `fedml simulate --dataset npz:DIR` trains the same federation as the built-in
dataset with the same split, partition and seed.

As `.csv` (tabular data only): each site's table as a hospital would export it, named
after the site (`cleveland.csv`, ...; `client-<i>.csv` where the data names no sites),
with a header of the features' names and a `label` column, the server's `test.csv`, and,
where the data gives each site test rows of its own, `site-tests/<site>.csv`: what
`--dataset csv:DIR`, `fedml client --data FILE.csv` and `--test-data` read.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np

from fedml.data.datasets import SITE_TESTS_DIR, Federation, Shard
from fedml.errors import FedmlError
from fedml.runstore import atomic_write

TEST_FILE = "test.npz"
CSV_TEST_FILE = "test.csv"
LABEL = "label"  # the label column of the CSV files written


def shard_file_name(index: int) -> str:
    """The file of client `index` (0-based), as `npz:DIR` federations name them."""
    return f"client-{index}.npz"


def write_split(
    federation: Federation, out: Path, force: bool = False, file_format: str = "npz"
) -> list[tuple[Path, int]]:
    """Write every client's shard and the test set into `out` (created if missing), as
    `.npz` or `.csv` files (`file_format`). A folder that already holds split files is
    refused unless `force`: a stale `client-7.npz` left from a larger split would join
    the next `npz:DIR` federation. With `force`, the old files are removed first.
    Returns each file written with its number of examples."""
    if file_format == "csv" and len(federation.input_shape) != 1:
        raise FedmlError(
            f"CSV files hold tables (one row of numbers per example); this data's examples "
            f"have shape {federation.input_shape}. Write it as npz."
        )
    old = _split_files(out) if out.is_dir() else []
    if old and not force:
        raise FedmlError(
            f"{out} already holds {len(old)} split file(s) ({old[0].name}, ...); choose "
            "another --out, or pass --force to replace them."
        )
    out.mkdir(parents=True, exist_ok=True)
    for path in old:
        path.unlink()
    if file_format == "csv":
        return _write_tables(federation, out)
    written = []
    for index in range(federation.num_clients):
        written.append(_write_shard(out / shard_file_name(index), federation.client(index)))
    if federation.test is not None:
        written.append(_write_shard(out / TEST_FILE, federation.test))
    return written


def _write_tables(federation: Federation, out: Path) -> list[tuple[Path, int]]:
    width = federation.input_shape[0]
    names = federation.feature_names or tuple(f"x{i}" for i in range(width))
    sites = federation.names or tuple(f"client-{i}" for i in range(federation.num_clients))
    written = [
        _write_table(out / f"{site}.csv", federation.client(index), names)
        for index, site in enumerate(sites)
    ]
    if federation.test is not None:
        written.append(_write_table(out / CSV_TEST_FILE, federation.test, names))
    if federation.site_tests:
        (out / SITE_TESTS_DIR).mkdir(exist_ok=True)
        for site, rows in zip(sites, federation.site_tests, strict=True):
            written.append(_write_table(out / SITE_TESTS_DIR / f"{site}.csv", rows, names))
    return written


def _write_table(path: Path, shard: Shard, names: tuple[str, ...]) -> tuple[Path, int]:
    """`shard` as a site CSV: the features' names and `label` as the header, one row per
    example, a missing value as an empty cell; written whole or not at all."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*names, LABEL])
    for features, label in zip(shard.x, shard.y.tolist(), strict=True):
        cells = ["" if np.isnan(v) else np.format_float_positional(v, trim="-") for v in features]
        writer.writerow([*cells, label])
    atomic_write(path, buffer.getvalue().encode())
    return path, len(shard)


def _split_files(folder: Path) -> list[Path]:
    tests = folder / SITE_TESTS_DIR
    own_tests = sorted(tests.glob("*.csv")) if tests.is_dir() else []
    return (
        sorted(
            p
            for p in folder.iterdir()
            if p.name == TEST_FILE or re.fullmatch(r"client-\d+\.npz", p.name) or p.suffix == ".csv"
        )
        + own_tests
    )


def _write_shard(path: Path, shard: Shard) -> tuple[Path, int]:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.ascontiguousarray(shard.x, dtype=np.float32), y=shard.y.astype(np.int64))
    atomic_write(path, buffer.getvalue())
    return path, len(shard)
