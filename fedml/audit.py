"""A tamper-evident audit trail: what a data site (or a server's run) did, one JSON line
per event.

`DIR/audit.jsonl` is append-only. Each entry carries its number `n` (1, 2, ...), the
SHA-256 `prev` of the entry before it (64 zeros for the first) and its own SHA-256
`hash` over its canonical JSON without `hash`. So an edited entry no longer matches its
hash, a deleted or reordered one breaks the numbering and the chain. `DIR/audit.head`
(replaced atomically after every append) holds the last entry's number and hash: a
trail cut short at the end, which the chain alone cannot show, no longer reaches it.
Appends are fsynced and serialised by an exclusive `flock`, as several task processes
of one site may write at once.

What it proves: that nobody edited, deleted, reordered or cut entries after they were
written, unless they rewrote the whole trail from the first changed entry on and the
head with it. A copy of the head kept elsewhere (`fedml audit verify` prints it) makes
that detectable too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from fedml import regular_files
from fedml.errors import FedmlError

TRAIL, HEAD, LOCK = "audit.jsonl", "audit.head", "audit.lock"
GENESIS = "0" * 64  # the `prev` of the first entry
RESERVED = ("n", "time", "prev", "hash")  # set by `append`, never by the caller
TAIL_BYTES = 1 << 20  # what `append` reads back of the trail's end (an entry is far less)


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of the entry's canonical JSON, its own `hash` left out."""
    body = {key: value for key, value in entry.items() if key != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def arrays_digest(arrays: Any) -> str | None:
    """SHA-256 over a Flower ArrayRecord's names and bytes, in record order (None: no
    arrays): how a trail names a model without holding it."""
    if arrays is None:
        return None
    hashed = hashlib.sha256()
    for name, array in arrays.items():
        hashed.update(name.encode() + b"\0" + array.data)
    return hashed.hexdigest()


def append(folder: Path, event: dict[str, Any]) -> dict[str, Any]:
    """Add `event` (JSON values) to the trail in `folder`; returns the entry written."""
    clash = [key for key in RESERVED if key in event]
    if clash:
        raise ValueError(f"an audit event may not set {clash}")
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / LOCK):
        count, last = _resume_point(folder)
        entry = {
            "n": count + 1,
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "prev": last,
            **event,
        }
        entry["hash"] = entry_hash(entry)
        line = json.dumps(entry, sort_keys=True, allow_nan=False) + "\n"
        with open(folder / TRAIL, "ab") as handle:
            handle.write(line.encode())
            handle.flush()
            os.fsync(handle.fileno())
        _write_head(folder, entry["n"], entry["hash"])
    return entry


@dataclass(frozen=True)
class Verdict:
    """What `verify` found: the entries that are intact, and the first problem."""

    entries: list[dict[str, Any]]
    problem: str | None  # None: the whole trail is intact
    head: tuple[int, str]  # the head file's (count, last hash)

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify(path: Path) -> Verdict:
    """Check the trail at `path` (the trail file or its folder): every entry's hash,
    numbering and link to the one before, and that it reaches the head."""
    folder = path if path.is_dir() else path.parent
    trail = folder / TRAIL
    if not trail.is_file():
        raise FedmlError(f"{folder} holds no audit trail ({TRAIL}).")
    head = _head(folder)
    data = regular_files.read_bytes(trail)
    entries: list[dict[str, Any]] = []
    previous = GENESIS
    for number, (line, complete) in enumerate(_lines(data), start=1):
        problem = _problem(line, complete, number, previous)
        if problem is not None:
            return Verdict(entries, f"entry {number}: {problem}", head)
        entry = json.loads(line)
        entries.append(entry)
        previous = entry["hash"]
    written, recorded = head
    if written > len(entries):
        cut = f"the trail ends at entry {len(entries)} but {written} were written: its tail was cut"
        return Verdict(entries, cut, head)
    # the head lags by one entry at most: the writer stopped between the two writes
    lagging = len(entries) == written + 1 and (
        written == 0 or entries[written - 1]["hash"] == recorded
    )
    if not (len(entries) == written and recorded == previous) and not lagging:
        return Verdict(entries, f"the trail is not the one {HEAD} recorded (rewritten)", head)
    return Verdict(entries, None, head)


def _problem(line: bytes, complete: bool, number: int, previous: str) -> str | None:
    """What is wrong with one line of the trail, or None."""
    if not complete:
        return "is incomplete (the writer stopped mid-line, or the file was cut)"
    try:
        entry = json.loads(line)
    except ValueError:
        return "is not JSON (edited, or damaged)"
    if not isinstance(entry, dict) or not all(key in entry for key in RESERVED):
        return "is not an audit entry"
    if entry["n"] != number:
        return f"is numbered {entry['n']}: entries were deleted or reordered"
    if entry["prev"] != previous:
        return "does not follow the entry before it: entries were deleted or reordered"
    if entry["hash"] != entry_hash(entry):
        return "was edited: its contents no longer match its hash"
    return None


def _lines(data: bytes) -> Iterator[tuple[bytes, bool]]:
    """Each line and whether it ended with a newline."""
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            yield data[start:], False
            return
        yield data[start:end], True
        start = end + 1


def _resume_point(folder: Path) -> tuple[int, str]:
    """(number, hash) of the last entry the next one follows. A line a writer left
    incomplete (it stopped mid-write, before the head moved) is cut off first; an entry
    written before the writer could move the head is taken as the last."""
    count, last = _head(folder)
    trail = folder / TRAIL
    if not trail.exists():
        return count, last
    with open(trail, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - TAIL_BYTES))
        tail = handle.read()
        if tail and not tail.endswith(b"\n"):
            keep = size - len(tail) + tail.rfind(b"\n") + 1
            handle.truncate(keep)
            os.fsync(handle.fileno())
            tail = tail[: tail.rfind(b"\n") + 1]
    lines = tail.splitlines()
    with contextlib.suppress(ValueError, KeyError, TypeError, IndexError):
        entry = json.loads(lines[-1])
        if entry["n"] == count + 1 and entry["prev"] == last:
            return entry["n"], entry["hash"]
    return count, last


def _head(folder: Path) -> tuple[int, str]:
    """(entries written, last hash) from the head file; (0, GENESIS) before the first."""
    path = folder / HEAD
    if not path.exists():
        return 0, GENESIS
    try:
        count, last = regular_files.read_text(path).split()
        return int(count), last
    except (ValueError, OSError) as exc:
        raise FedmlError(f"{path} is damaged ({exc}); the trail cannot be extended.") from exc


def _write_head(folder: Path, count: int, last: str) -> None:
    staging = folder / f".{HEAD}.{os.getpid()}.tmp"
    with open(staging, "wb") as handle:
        handle.write(f"{count} {last}\n".encode())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, folder / HEAD)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[IO[str]]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
