"""Reading only regular files: a FIFO is damage, not a hang.

Reading a FIFO waits for a writer that may never come (and a device may never end), so
a run folder, a data file or a shard that is one would hang `fedml runs`, `--resume`,
`fedml client` or `fedml simulate`. Each file fedml reads on a user's word goes through
here: opened without blocking, checked to be a regular file (links followed), then read.
`NotRegularFile` is an `OSError`, so code that treats an unreadable file as damage
treats these the same way.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fedml.errors import FedmlError

KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


class NotRegularFile(OSError):
    """The path is a FIFO, device, socket or directory, not a regular file."""


def kind(mode: int) -> str:
    """What a file of this `st_mode` is, in words ("a FIFO", ...)."""
    return KINDS.get(stat.S_IFMT(mode), "not a regular file")


def read_bytes(path: Path) -> bytes:
    """The bytes of the regular file `path`; `NotRegularFile` for anything else."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO's open would block
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{path} is {kind(mode)}, not a regular file")
        os.set_blocking(descriptor, True)
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            return handle.read()
    finally:
        os.close(descriptor)


def read_text(path: Path, errors: str = "strict") -> str:
    """The UTF-8 text of the regular file `path` (see `read_bytes`)."""
    return read_bytes(path).decode("utf-8", errors=errors)


def require_regular(path: Path, what: str) -> None:
    """A `FedmlError` naming `what` unless `path` is a regular file (links followed);
    for readers that take a path (NumPy, zipfile). A missing path is left to them."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        raise FedmlError(
            f"{what} {path} is {kind(mode)}, not a regular file; point to the file itself."
        )
