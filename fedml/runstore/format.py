"""The run directory's on-disk format: file names, commits, digests, and reading them back.

Everything here reads; nothing writes. A commit is verified as a function of the run
directory (its manifest covers a prefix of the run's history.jsonl), so the writer, the
resume policy and the read-only status view all judge commits the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import tomllib
from flwr.app import ArrayRecord, RecordDict

from fedml import regular_files
from fedml.arrays import from_numpy, to_numpy
from fedml.config import RunConfig, load_config
from fedml.errors import FedmlError
from fedml.records import HistoryRow
from fedml.statefile import decode_state, recorddict_from_bytes

log = logging.getLogger(__name__)

CONFIG = "config.toml"
HISTORY = "history.jsonl"
MODEL = "model.safetensors"
BEST = "best.safetensors"  # the best round by checkpoint.monitor (validation rows)
COMMITS = "commits"
DAMAGED = "damaged"
DEPLOYED = "deployed"  # marker: the run was started by `fedml server` (real sites)
LOCK = ".lock"
MANIFEST = "MANIFEST.json"
ARRAYS_FILE = "arrays.safetensors"
STATE_FILE = "state.json"
STATE_ARRAYS_FILE = "state.safetensors"
NODES_FILE = "nodes.safetensors"
FORMAT = 1
ARRAYS_METADATA = "fedml"
COMMIT_PREFIX = "round-"


# ------------------------------------------------------------------------ the run directory
def read_config(run_dir: Path) -> RunConfig:
    """The config of the run at `run_dir`; a clear error when it is not a run directory."""
    if not (run_dir / CONFIG).is_file():
        what = "does not exist" if not run_dir.exists() else f"has no {CONFIG}"
        raise FedmlError(
            f"{run_dir} {what}, so it is not a fedml run directory. Pass the --out "
            "directory of an earlier `fedml simulate`."
        )
    return load_config(run_dir / CONFIG, {"out": str(run_dir), **_migrated(run_dir / CONFIG)})


def _migrated(config: Path) -> dict[str, str]:
    """Overrides that let a run made by an earlier fedml load: its best model chosen on
    the test set (`checkpoint.monitor = "server.*"`, refused since) is chosen on
    validation rows (`auto`) from now on, and the run says so."""
    try:
        monitor = tomllib.loads(regular_files.read_text(config))["checkpoint"]["monitor"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # load_config reports what is wrong with the file
    if isinstance(monitor, str) and monitor.startswith("server."):
        log.warning(
            "%s: checkpoint.monitor '%s' chose the best model on the test set; it is "
            "chosen on the sites' validation rows (auto) from now on",
            config.parent, monitor,
        )  # fmt: skip
        return {"checkpoint.monitor": "auto"}
    return {}


def is_deployed(run_dir: Path) -> bool:
    """Whether `fedml server` started the run at `run_dir` (its sites are real)."""
    return (run_dir / DEPLOYED).is_file()


def resume_command(run_dir: Path) -> str:
    """The command that continues the run at `run_dir` (the way it started)."""
    if is_deployed(run_dir):
        return f"fedml server --resume {run_dir} --pki PKI_DIR"
    return f"fedml simulate --resume {run_dir}"


def find_runs(path: Path) -> list[Path]:
    """`path` itself when it is a run directory, else the run directories inside it."""
    if (path / CONFIG).is_file():
        return [path]
    if not path.exists():
        raise FedmlError(f"{path} does not exist. Pass a run directory or a folder of runs.")
    runs = sorted(p for p in path.iterdir() if (p / CONFIG).is_file()) if path.is_dir() else []
    if not runs:
        raise FedmlError(
            f"{path} is neither a run directory nor a folder of runs (no {CONFIG} found). "
            "Pass a `fedml simulate --out` directory or its parent (default: runs)."
        )
    return runs


def read_history(path: Path) -> list[HistoryRow]:
    """History rows that parse as rows (a damaged tail is skipped, not fatal, for
    reporting: the commits, verified separately, say what is real)."""
    rows = []
    try:
        lines = regular_files.read_text(path / HISTORY, errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            break
        if not isinstance(row, dict) or type(row.get("round")) is not int:
            break
        rows.append(cast(HistoryRow, row))  # what the round loop wrote, read back
    return rows


# ------------------------------------------------------------------------ commit names
def commit_name(server_round: int) -> str:
    """The name of a round's commit directory (round-000012)."""
    return f"{COMMIT_PREFIX}{server_round:06d}"


def commit_round(path: Path) -> int | None:
    """The round a commit directory's name says (None for anything else)."""
    name = path.name
    if not name.startswith(COMMIT_PREFIX) or not name[len(COMMIT_PREFIX) :].isdigit():
        return None
    return int(name[len(COMMIT_PREFIX) :])


def list_commit_dirs(run_dir: Path) -> list[Path]:
    """The commit directories of the run at `run_dir`, oldest first (names only; not
    verified)."""
    root = run_dir / COMMITS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and commit_round(p) is not None]
    return sorted(found, key=lambda p: commit_round(p) or 0)


def newest_stop_reason(run_dir: Path) -> str | None:
    """The stop reason in the newest commit's state file, unverified: a cheap look while
    another process writes the run (`run_status` verifies every commit). None when there
    is no commit, no stop reason, or the file cannot be read."""
    commits = list_commit_dirs(run_dir)
    try:
        state = json.loads(regular_files.read_bytes(commits[-1] / STATE_FILE))
    except (IndexError, OSError, ValueError):
        return None
    reason = state.get("stop_reason") if isinstance(state, dict) else None
    return reason if isinstance(reason, str) else None


# ------------------------------------------------------------------------ digests
def file_digest(data: bytes) -> dict[str, Any]:
    """A manifest's entry for one file (or the history prefix): SHA-256 and size."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's own content (all keys but "sha256"), canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------ what a commit holds
@dataclass(frozen=True)
class Checkpoint:
    """A verified commit, decoded: everything the round loop needs to continue."""

    round: int
    arrays: ArrayRecord
    state: dict[str, Any]
    node_states: dict[int, RecordDict]
    stop_reason: str | None
    experiment: dict[str, Any]
    path: Path
    keep_round: int | None = None
    model_round: int | None = None


@dataclass(frozen=True)
class CommitCheck:
    """The verdict on one commit directory: `problem` is None when it is intact."""

    path: Path
    round: int
    problem: str | None


def encode_arrays(
    arrays: ArrayRecord, server_round: int, description: dict[str, Any] | None = None
) -> bytes:
    """A model as safetensors bytes: the same model gives the same bytes. `description`
    (what rebuilds the module: `fedml.models.describe_model`) joins the metadata, so
    the file alone serves the model (`fedml.models.load_model`)."""
    from safetensors.numpy import save

    tensors = {k: np.require(to_numpy(v), requirements="C") for k, v in arrays.items()}
    # One metadata entry: safetensors orders several entries differently from process
    # to process, and the same model must give the same bytes.
    ours: dict[str, Any] = {"round": server_round, "keys": list(tensors)}
    if description is not None:
        ours["model"] = description
    metadata = {ARRAYS_METADATA: json.dumps(ours)}
    return save(tensors, metadata=metadata)


def _decode_arrays(data: bytes) -> ArrayRecord:
    """Arrays in the order they were saved (safetensors itself sorts names)."""
    from safetensors.numpy import load

    tensors = load(data)
    ours = _safetensors_metadata(data).get(ARRAYS_METADATA)
    keys = json.loads(ours)["keys"] if ours else list(tensors)
    return ArrayRecord({k: from_numpy(tensors[k]) for k in keys})


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}


def read_model(path: Path) -> ArrayRecord:
    """Load a model file written by the run store (e.g. `model.safetensors`)."""
    return _decode_arrays(path.read_bytes())


def read_model_description(path: Path) -> dict[str, Any] | None:
    """What rebuilds the module of a model file (None: the file does not say)."""
    ours = _safetensors_metadata(path.read_bytes()).get(ARRAYS_METADATA)
    return json.loads(ours).get("model") if ours else None


# ------------------------------------------------------------------------ verification
class DamagedCommit(Exception):
    """A commit failed verification (callers outside the run store get `CommitCheck` or
    FedmlError)."""


def check_commit(run_dir: Path, commit: Path) -> CommitCheck:
    """Verify one commit: manifest, every file's size and SHA-256, history prefix,
    and that its contents decode (a checksum can be re-sealed by hand)."""
    server_round = commit_round(commit) or 0
    try:
        load_commit(run_dir, commit)
    except DamagedCommit as exc:
        return CommitCheck(commit, server_round, str(exc))
    return CommitCheck(commit, server_round, None)


def load_commit(run_dir: Path, commit: Path) -> Checkpoint:
    """Verify and decode one commit of the run at `run_dir`; raises `DamagedCommit`."""
    from safetensors.numpy import load as load_tensors

    files = _read_verified(run_dir, commit)
    try:  # checksums can be re-sealed by hand: the contents are checked too
        state = json.loads(files[STATE_FILE])
        arrays_of = load_tensors(files[STATE_ARRAYS_FILE]) if STATE_ARRAYS_FILE in files else {}
        nodes = load_tensors(files[NODES_FILE]) if NODES_FILE in files else {}
        checkpoint = Checkpoint(
            round=state["round"],
            arrays=_decode_arrays(files[ARRAYS_FILE]),
            state=decode_state(state["components"], arrays_of),
            node_states={int(n): recorddict_from_bytes(b.tobytes()) for n, b in nodes.items()},
            stop_reason=state.get("stop_reason"),
            experiment=state["experiment"],
            path=commit,
            keep_round=state.get("keep_round"),
            model_round=state.get("model_round"),
        )
    except Exception as exc:  # whatever a hand-made file makes the decoders raise
        raise DamagedCommit(f"its contents do not decode ({type(exc).__name__}: {exc})") from None
    if checkpoint.round != commit_round(commit):
        raise DamagedCommit(f"{STATE_FILE} names round {checkpoint.round}")
    return checkpoint


def _read_verified(run_dir: Path, commit: Path) -> dict[str, bytes]:
    """The commit's files, each checked against the manifest; raises `DamagedCommit`."""
    try:
        manifest = json.loads(regular_files.read_bytes(commit / MANIFEST))
    except FileNotFoundError:
        raise DamagedCommit(f"{MANIFEST} is missing") from None
    except (OSError, ValueError) as exc:
        raise DamagedCommit(f"{MANIFEST} is unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DamagedCommit(f"{MANIFEST} is not a fedml format-{FORMAT} manifest")
    if manifest.get("sha256") != manifest_digest(manifest):
        raise DamagedCommit(f"{MANIFEST} fails its own checksum (modified)")
    if manifest.get("round") != commit_round(commit):
        raise DamagedCommit(f"{MANIFEST} names round {manifest.get('round')}")
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not isinstance(manifest.get("history"), dict):
        raise DamagedCommit(f"{MANIFEST} has unexpected contents ('files' or 'history')")
    files: dict[str, bytes] = {}
    for name, expected in listed.items():
        if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
            raise DamagedCommit(f"{MANIFEST} lists {name!r}, which is not a file of the commit")
        data = _read_regular(commit / name)  # never a FIFO or device: it could hang
        if data is None:
            raise DamagedCommit(f"{name} is missing or not a regular file")
        if file_digest(data) != expected:
            raise DamagedCommit(f"{name} fails its checksum (truncated or modified)")
        files[name] = data
    for required in (ARRAYS_FILE, STATE_FILE):
        if required not in files:
            raise DamagedCommit(f"{MANIFEST} does not list {required}")
    _check_history_prefix(run_dir, manifest.get("history", {}))
    return files


def _check_history_prefix(run_dir: Path, expected: dict[str, Any]) -> None:
    size = expected.get("bytes", -1)
    if type(size) is not int:
        raise DamagedCommit(f"{MANIFEST} records history size {size!r}, not a byte count")
    try:
        prefix = regular_files.read_bytes(run_dir / HISTORY)[: max(size, 0)]
    except FileNotFoundError:
        raise DamagedCommit(f"{HISTORY} is missing") from None
    except OSError as exc:
        raise DamagedCommit(f"{HISTORY} is unreadable ({exc})") from None
    if len(prefix) != size:
        raise DamagedCommit(f"{HISTORY} is shorter than this commit recorded ({size} bytes)")
    if hashlib.sha256(prefix).hexdigest() != expected.get("sha256"):
        raise DamagedCommit(f"{HISTORY} was modified before this commit's last row")


def _read_regular(path: Path) -> bytes | None:
    """The bytes of `path` if it is a regular file (following links), else None."""
    try:
        return regular_files.read_bytes(path)
    except OSError:
        return None
