"""A data site's state folder belongs to one site: locked while its `fedml client` runs,
and bound to the site's key and data file.

The folder holds the site's prepared data, its lifetime privacy ledger and its logs. Two
clients sharing it would train on one site's data under two keys (or mix two sites'
ledgers), so:

- while a client runs it holds an exclusive `flock` on `STATE/site.lock`; a second client
  on the same folder is refused at once, naming `--state-dir`;
- `STATE/site.json` records the site it serves (the SHA-256 fingerprint of its public key,
  or "insecure", and the resolved data path); a client started on the folder with another
  key or another data file is refused instead of silently using the other's data;
- the default folder is derived from the site: `fedml-site-NAME` for the PKI folder
  `sites/NAME`, `fedml-site-STEM` for `--insecure` runs (STEM: the data file's name), so
  two sites started from one folder get two state folders by themselves.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from cryptography.hazmat.primitives import serialization

from fedml.errors import FedmlError
from fedml.pki import NODE_KEY, load_node_private_key

# Lines of the site executor's log that `fedml client` repeats on the site's console.
TASK_FAILED_MARK, TASK_DONE_MARK = "fedml task failed: ", "fedml task done: "
TASK_REFUSED_MARK = "fedml task refused: "  # the site's policy refused it
LOCK_FILE = "site.lock"
IDENTITY_FILE = "site.json"
DEFAULT_PREFIX = "fedml-site-"


def site_name(pki: Path | None, data: Path) -> str:
    """A site's name: its PKI folder's (`fedml certs add-node NAME` made sites/NAME), or
    without a key its data file's name without suffixes."""
    name = pki.resolve().name if pki is not None else data.resolve().name.split(".")[0]
    return name or "site"


LEGACY_DEFAULT = Path("fedml-site")  # the default before it was named after the site


def default_state_dir(name: str) -> Path:
    """The state folder site `name` uses unless `--state-dir` says otherwise (relative to
    the working directory). A folder left by an earlier fedml under the old shared default
    is never silently replaced by a new one: it holds the site's lifetime privacy ledger."""
    if LEGACY_DEFAULT.is_dir():
        raise FedmlError(
            f"This folder holds {LEGACY_DEFAULT}/, the state folder of an earlier fedml "
            "(with the site's lifetime privacy ledger); state folders are now named after "
            f"the site ({DEFAULT_PREFIX}{name}). Keep using it with --state-dir "
            f"{LEGACY_DEFAULT}, or rename it to {DEFAULT_PREFIX}{name}."
        )
    return Path(DEFAULT_PREFIX + name)


def key_fingerprint(pki: Path | None) -> str:
    """Which site a folder serves: the SHA-256 of the site's public key (OpenSSH form),
    or "insecure" without a key."""
    if pki is None:
        return "insecure"
    public = load_node_private_key(pki / NODE_KEY).public_key()
    raw = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


@contextlib.contextmanager
def claim(state_dir: Path, fingerprint: str, data: Path) -> Iterator[Path]:
    """Hold `state_dir` for this site while the block runs: locked against a second
    client, and checked (or, the first time, marked) as serving this key and data."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / LOCK_FILE).open("a+", encoding="utf-8") as handle:
        _lock(handle, state_dir)
        if data.exists():  # else the data check says what is wrong, binding nothing
            _check_identity(state_dir, {"key": fingerprint, "data": str(data.resolve())})
        yield state_dir


def _lock(handle: IO[str], state_dir: Path) -> None:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        raise FedmlError(
            f"The site state folder {state_dir} is in use by another fedml client (pid "
            f"{owner}). Each site needs its own folder: give this one another --state-dir "
            "(and its own --port)."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()


def _check_identity(state_dir: Path, identity: dict[str, str]) -> None:
    path = state_dir / IDENTITY_FILE
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        stored = None
    except (OSError, ValueError) as exc:
        raise FedmlError(
            f"{path} is damaged ({exc}). It says which site this folder serves; remove it "
            "only if this folder belongs to this site."
        ) from exc
    if stored is None:
        path.write_text(json.dumps(identity, indent=1, sort_keys=True), encoding="utf-8")
        return
    if not isinstance(stored, dict) or stored.get("key") != identity["key"]:
        raise FedmlError(
            f"The site state folder {state_dir} belongs to another site (key "
            f"{stored.get('key') if isinstance(stored, dict) else '?'}; this client's is "
            f"{identity['key']}). Give this site its own --state-dir."
        )
    if stored.get("data") != identity["data"]:
        raise FedmlError(
            f"The site state folder {state_dir} serves the data {stored.get('data')}, not "
            f"{identity['data']}. Give this data its own --state-dir; if this site's data "
            f"really moved, remove {path} (the privacy ledger beside it stays)."
        )
