"""Durable file writes: what is written is on disk when the call returns.

`write_synced` is the one place that writes and fsyncs a file; `atomic_write` builds a
whole-file replacement on it. Other fedml modules (the report, a site's data cache, the
privacy ledger) use `atomic_write` and `storage_error` as well.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from fedml.errors import FedmlError


def write_synced(path: Path, data: bytes, *, append: bool = False) -> None:
    """Write `data` to `path` (replacing it, or appended to it with `append`) and fsync
    the file. A new directory entry is durable only once its directory is fsynced too
    (`fsync_dir`)."""
    with open(path, "ab" if append else "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_synced(Path(tmp), data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(exc: OSError, doing: str, last_round: int | None = None) -> FedmlError:
    """One clear error for a file system that refuses a write (full, read-only, no
    permission): what was being done and, during a run, the last intact round."""
    reasons = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
    }
    reason = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    where = f" ({exc.filename})" if exc.filename else ""
    kept = (
        f" The last intact round is {last_round}; free space (or fix the permissions) and "
        "continue with --resume: nothing committed was lost."
        if last_round is not None
        else " Nothing committed was lost; fix it and run the command again."
    )
    return FedmlError(f"{reason.capitalize()} while {doing}{where}.{kept}")
