"""A built-in dataset's split as site files: what `fedml data split` writes.

Each client's shard becomes `client-<i>.npz` and the server's test set `test.npz`, both
holding `x` (float32 features, preprocessed exactly as `fedml simulate` preprocesses the
dataset) and `y` (int64 labels). A site passes its file to `fedml client --data`, the
server the folder to `--dataset npz:DIR` (it reads `test.npz` only), and `fedml simulate
--dataset npz:DIR` trains the same federation as the built-in dataset with the same
split, partition and seed.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

from fedml.data.datasets import Federation, Shard
from fedml.errors import FedmlError
from fedml.runstore import atomic_write

TEST_FILE = "test.npz"


def shard_file_name(index: int) -> str:
    """The file of client `index` (0-based), as `npz:DIR` federations name them."""
    return f"client-{index}.npz"


def write_split(federation: Federation, out: Path, force: bool = False) -> list[tuple[Path, int]]:
    """Write every client's shard and the test set into `out` (created if missing).
    A folder that already holds shards is refused unless `force`: a stale
    `client-7.npz` left from a larger split would join the next `npz:DIR` federation.
    With `force`, the old shards and test set are removed first. Returns each file
    written with its number of examples."""
    old = _split_files(out) if out.is_dir() else []
    if old and not force:
        raise FedmlError(
            f"{out} already holds {len(old)} split file(s) ({old[0].name}, ...); choose "
            "another --out, or pass --force to replace them."
        )
    out.mkdir(parents=True, exist_ok=True)
    for path in old:
        path.unlink()
    written = []
    for index in range(federation.num_clients):
        written.append(_write_shard(out / shard_file_name(index), federation.client(index)))
    if federation.test is not None:
        written.append(_write_shard(out / TEST_FILE, federation.test))
    return written


def _split_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.name == TEST_FILE or re.fullmatch(r"client-\d+\.npz", p.name)
    )


def _write_shard(path: Path, shard: Shard) -> tuple[Path, int]:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.ascontiguousarray(shard.x, dtype=np.float32), y=shard.y.astype(np.int64))
    atomic_write(path, buffer.getvalue())
    return path, len(shard)
