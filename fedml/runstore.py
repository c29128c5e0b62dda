"""The run directory: config, history, latest model, and one atomic commit per round.

Layout (a public format, documented in README):

    config.toml              the resolved RunConfig
    history.jsonl            one JSON object per completed round (append-only)
    model.safetensors        the run's global model: a hard link to the latest commit's
                             arrays, or, once early stopping ended the run with
                             `stop.restore_best`, to the best round's
    commits/round-000012/    one commit per round; the newest `checkpoint.keep`, the
                             best by `checkpoint.monitor` and the early-stopping best
                             round are kept
        arrays.safetensors   the global model (torch state-dict names, in model order)
        state.json           round, stop reason, experiment identity, component state,
                             the rounds it pins (keep_round, model_round)
        state.safetensors    the arrays that component state references (if any)
        nodes.safetensors    per-node Flower `Context.state` (Flower's protobuf bytes)
        MANIFEST.json        SHA-256 and size of every file above and of the
                             history.jsonl prefix this commit covers, and a SHA-256
                             of the manifest itself
    damaged/                 commits that failed verification at resume, kept for a look
    .lock                    held (flock) by the one process writing the run

A round is committed in an order that makes a crash at any instant cost at most that
round: (0) right after aggregation, while the round's evaluation runs, a background
worker writes the model file into `commits/.round-000012.tmp` and fsyncs it; (1) the
round's history row is appended to history.jsonl and fsynced; (2) the commit's other
files, then its manifest, are written into the same folder (each fsynced), and the
folder is renamed into place (atomic) and its parent fsynced — a commit directory
without a valid manifest is not a commit; (3) model.safetensors is atomically replaced by
a hard link to the commit's arrays; (4) commits no longer kept are renamed aside and
deleted in the background. Resume verifies the newest commit (every checksum and the
history prefix), falls back to older ones when it is damaged, then truncates
history.jsonl to what the chosen commit covers and relinks model.safetensors. Nothing
is ever read with pickle.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedml.arrays import from_numpy, to_numpy
from fedml.config import (
    RunConfig,
    experiment_identity,
    identity_changes,
    load_config,
    with_overrides,
)
from fedml.errors import FedmlError
from fedml.monitor import Monitor
from fedml.statefile import decode_state, encode_state, recorddict_from_bytes, recorddict_to_bytes

log = logging.getLogger(__name__)

CONFIG = "config.toml"
HISTORY = "history.jsonl"
MODEL = "model.safetensors"
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


def default_run_path(root: Path = Path("runs")) -> Path:
    """runs/<timestamp>, made unique with a suffix when two runs start the same second."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = root / stamp, 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{n}"
    return path


def commit_name(server_round: int) -> str:
    return f"{COMMIT_PREFIX}{server_round:06d}"


# ------------------------------------------------------------------------ durable writes
def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
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


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _digest(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _manifest_digest(manifest: dict[str, Any]) -> str:
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


def _encode_arrays(arrays: ArrayRecord, server_round: int) -> bytes:
    from safetensors.numpy import save

    tensors = {k: np.require(to_numpy(v), requirements="C") for k, v in arrays.items()}
    # One metadata entry: safetensors orders several entries differently from process
    # to process, and the same model must give the same bytes.
    metadata = {ARRAYS_METADATA: json.dumps({"round": server_round, "keys": list(tensors)})}
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


# ------------------------------------------------------------------------ the store
class RunStore:
    """Reads and writes one run directory."""

    def __init__(self, path: Path, cfg: RunConfig) -> None:
        self.path = path
        self.cfg = cfg
        self._rows: list[dict[str, Any]] = []
        self._history_hash = hashlib.sha256()
        self._history_bytes = 0
        # One background worker (started on first use, stopped by `close`): writes
        # staged model files, deletes pruned commits.
        self._background: ThreadPoolExecutor | None = None
        self._staged: tuple[int, Future] | None = None
        self._lock_handle: IO[str] | None = None
        self._pinned: set[int] = set()  # rounds kept whatever the retention says
        self.model_round: int | None = None  # the round model.safetensors holds

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, cfg: RunConfig, deployed: bool = False) -> RunStore:
        """Start a new run directory; refuse one that already holds a run. `deployed`:
        its sites are real (`fedml server`), so it resumes only that way (`DEPLOYED`)."""
        if (path / CONFIG).exists() or any((path / COMMITS).glob(f"{COMMIT_PREFIX}*")):
            raise FedmlError(
                f"{path} already holds a run. Resume it with `fedml simulate --resume {path}`, "
                "or choose another --out directory."
            )
        try:
            (path / COMMITS).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FedmlError(f"Cannot create run directory {path}: {exc}.") from exc
        cfg = with_overrides(cfg, {"out": str(path)})
        store = cls(path, cfg)
        store._lock()
        atomic_write(path / HISTORY, b"")
        if deployed:
            atomic_write(path / DEPLOYED, b"started by fedml server; resume with it\n")
        atomic_write(path / CONFIG, cfg.to_toml().encode())  # last: marks a run
        return store

    @classmethod
    def open(cls, path: Path) -> RunStore:
        """Open an existing run directory (reads only its config)."""
        if not (path / CONFIG).is_file():
            what = "does not exist" if not path.exists() else f"has no {CONFIG}"
            raise FedmlError(
                f"{path} {what}, so it is not a fedml run directory. Pass the --out "
                "directory of an earlier `fedml simulate`."
            )
        return cls(path, load_config(path / CONFIG, {"out": str(path)}))

    @property
    def deployed(self) -> bool:
        """Whether `fedml server` started this run (its sites are real)."""
        return (self.path / DEPLOYED).is_file()

    # -- commits ------------------------------------------------------------------------
    def commit_dirs(self) -> list[Path]:
        """Commit directories, oldest first (names only; not verified)."""
        return list_commit_dirs(self.path)

    def check(self, commit: Path) -> CommitCheck:
        """Verify one commit: manifest, every file's size and SHA-256, history prefix,
        and that its contents decode (a checksum can be re-sealed by hand)."""
        server_round = commit_round(commit) or 0
        try:
            self.load(commit)
        except _Damaged as exc:
            return CommitCheck(commit, server_round, str(exc))
        return CommitCheck(commit, server_round, None)

    def _read_verified(self, commit: Path) -> dict[str, bytes]:
        """The commit's files, each checked against the manifest; raises `_Damaged`."""
        try:
            manifest = json.loads((commit / MANIFEST).read_bytes())
        except FileNotFoundError:
            raise _Damaged(f"{MANIFEST} is missing") from None
        except (OSError, ValueError) as exc:
            raise _Damaged(f"{MANIFEST} is unreadable ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise _Damaged(f"{MANIFEST} is not a fedml format-{FORMAT} manifest")
        if manifest.get("sha256") != _manifest_digest(manifest):
            raise _Damaged(f"{MANIFEST} fails its own checksum (modified)")
        if manifest.get("round") != commit_round(commit):
            raise _Damaged(f"{MANIFEST} names round {manifest.get('round')}")
        listed = manifest.get("files")
        if not isinstance(listed, dict) or not isinstance(manifest.get("history"), dict):
            raise _Damaged(f"{MANIFEST} has unexpected contents ('files' or 'history')")
        files: dict[str, bytes] = {}
        for name, expected in listed.items():
            if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
                raise _Damaged(f"{MANIFEST} lists {name!r}, which is not a file of the commit")
            data = _read_regular(commit / name)  # never a FIFO or device: it could hang
            if data is None:
                raise _Damaged(f"{name} is missing or not a regular file")
            if _digest(data) != expected:
                raise _Damaged(f"{name} fails its checksum (truncated or modified)")
            files[name] = data
        for required in (ARRAYS_FILE, STATE_FILE):
            if required not in files:
                raise _Damaged(f"{MANIFEST} does not list {required}")
        self._check_history_prefix(manifest.get("history", {}))
        return files

    def _check_history_prefix(self, expected: dict[str, Any]) -> None:
        size = expected.get("bytes", -1)
        if type(size) is not int:
            raise _Damaged(f"{MANIFEST} records history size {size!r}, not a byte count")
        try:
            with open(self.path / HISTORY, "rb") as handle:
                prefix = handle.read(size) if size >= 0 else b""
        except OSError:
            raise _Damaged(f"{HISTORY} is missing") from None
        if len(prefix) != size:
            raise _Damaged(f"{HISTORY} is shorter than this commit recorded ({size} bytes)")
        if hashlib.sha256(prefix).hexdigest() != expected.get("sha256"):
            raise _Damaged(f"{HISTORY} was modified before this commit's last row")

    def load(self, commit: Path) -> Checkpoint:
        """Verify and decode one commit."""
        from safetensors.numpy import load as load_tensors

        files = self._read_verified(commit)
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
            raise _Damaged(f"its contents do not decode ({type(exc).__name__}: {exc})") from None
        if checkpoint.round != commit_round(commit):
            raise _Damaged(f"{STATE_FILE} names round {checkpoint.round}")
        return checkpoint

    def latest_valid(self) -> tuple[Checkpoint | None, list[CommitCheck]]:
        """The newest intact commit (None when the run has none yet) and the damaged
        commits newer than it. Raises when commits exist but none is intact. Read-only."""
        damaged: list[CommitCheck] = []
        for commit in reversed(self.commit_dirs()):
            try:
                return self.load(commit), damaged
            except _Damaged as exc:
                damaged.append(CommitCheck(commit, commit_round(commit) or 0, str(exc)))
        if damaged:
            details = "; ".join(f"{c.path.name}: {c.problem}" for c in damaged)
            raise FedmlError(
                f"No intact commit in {self.path / COMMITS} ({details}). Nothing was changed. "
                "Restore the run directory from a backup, or start a new run."
            )
        return None, damaged

    # -- resume -------------------------------------------------------------------------
    def resume(self, cfg: RunConfig) -> tuple[Checkpoint | None, list[CommitCheck]]:
        """Prepare the directory to continue with `cfg`: pick the newest intact commit,
        check it belongs to this experiment, then (and only then) move damaged commits
        to damaged/, cut history.jsonl back to that commit and relink model.safetensors.
        Returns the checkpoint (None: no round was committed yet) and what was damaged.
        The directory stays locked against other fedml processes until `close`."""
        self._lock()
        try:
            return self._resume(cfg)
        except BaseException:
            self._unlock()
            raise

    def _resume(self, cfg: RunConfig) -> tuple[Checkpoint | None, list[CommitCheck]]:
        checkpoint, damaged = self.latest_valid()
        done = checkpoint.round if checkpoint else 0
        if checkpoint is not None:
            changes = identity_changes(checkpoint.experiment, experiment_identity(cfg))
            if changes:
                raise FedmlError(
                    f"{self.path / CONFIG} no longer matches the experiment its commits were "
                    f"made with ({'; '.join(changes)}). Nothing was changed. Put the committed "
                    "values back, or start a new run."
                )
        if cfg.rounds < done:
            raise FedmlError(
                f"{self.path} already has {done} committed rounds; rounds = {cfg.rounds} would "
                f"discard some. Pass --rounds {done} or more (more extends the run)."
            )
        self._refuse_lost_rounds(done, damaged)
        # -- from here on the directory changes
        self._clean_leftovers()
        for check in damaged:
            self._set_aside(check.path)
            log.warning(
                "commit %s is damaged (%s); moved to %s/ and resuming from round %d",
                check.path.name,
                check.problem,
                DAMAGED,
                done,
            )
        self._truncate_history(checkpoint)
        if checkpoint is not None:
            self._pin(checkpoint.keep_round, checkpoint.model_round)
            self._link_model(self._model_commit(checkpoint.path, checkpoint.model_round))
        else:
            (self.path / MODEL).unlink(missing_ok=True)
        if cfg.to_toml() != self.cfg.to_toml():
            atomic_write(self.path / CONFIG, cfg.to_toml().encode())
        self.cfg = cfg
        return checkpoint, damaged

    def _refuse_lost_rounds(self, done: int, damaged: list[CommitCheck]) -> None:
        """Resuming cuts history.jsonl back to the newest intact commit (round `done`).
        A crash leaves at most one row past the newest commit folder (the round whose
        commit was being written); damaged commits are kept in damaged/, and retention
        prunes only rounds older than the newest commit. Any other row names a round whose
        commit is gone (commits/ deleted or emptied by hand). Cutting it would lose it for
        good: refuse, change nothing."""
        # rounds up to the newest commit folder (intact or damaged) may have been pruned
        # by retention on purpose; beyond it, only the one being committed may lack one
        newest = max([done, *(check.round for check in damaged)])
        lost = sorted(r["round"] for r in read_history(self.path) if r["round"] > newest + 1)
        if lost:
            intact = f"round {done}" if done else "none"
            raise FedmlError(
                f"{self.path / HISTORY} holds rounds up to {lost[-1]}, but no commit in "
                f"{self.path / COMMITS} holds rounds {lost[0]}..{lost[-1]} (newest intact "
                f"commit: {intact}); were commits deleted? Resuming would discard those "
                "rounds, so nothing was changed. Restore commits/ from a backup, or start "
                "afresh in a new directory (--out NEW_DIR), which leaves this one as it is."
            )

    def _truncate_history(self, checkpoint: Checkpoint | None) -> None:
        size = 0
        if checkpoint is not None:
            manifest = json.loads((checkpoint.path / MANIFEST).read_bytes())
            size = manifest["history"]["bytes"]
        history = self.path / HISTORY
        with open(history, "a+b") as handle:
            handle.truncate(size)
            handle.flush()
            os.fsync(handle.fileno())
            handle.seek(0)
            data = handle.read()
        self._history_hash = hashlib.sha256(data)
        self._history_bytes = len(data)
        self._rows = [json.loads(line) for line in data.decode("utf-8").splitlines()]

    def _clean_leftovers(self) -> None:
        """Delete what a crash can leave behind: half-written commits, half-pruned ones."""
        root = self.path / COMMITS
        root.mkdir(exist_ok=True)
        for entry in root.iterdir():
            if entry.name.startswith("."):
                shutil.rmtree(entry, ignore_errors=True)
        for entry in self.path.glob(f".{MODEL}.*"):
            entry.unlink(missing_ok=True)

    def _set_aside(self, commit: Path) -> None:
        target_root = self.path / DAMAGED
        target_root.mkdir(exist_ok=True)
        target, n = target_root / commit.name, 1
        while target.exists():
            n += 1
            target = target_root / f"{commit.name}-{n}"
        os.rename(commit, target)
        fsync_dir(commit.parent)

    # -- committing ---------------------------------------------------------------------
    def stage(self, server_round: int, arrays: ArrayRecord) -> None:
        """Start writing (and fsyncing) the round's model file in the background, so the
        disk works while the round's evaluation runs; `commit` waits for it. Nothing is
        published until `commit`: a crash meanwhile leaves only a staging folder."""
        future = self._submit(self._write_arrays, server_round, arrays)
        self._staged = (server_round, future)

    def _write_arrays(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any]:
        staging = self._staging_dir(server_round)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        data = _encode_arrays(arrays, server_round)
        _write_synced(staging / ARRAYS_FILE, data)
        return _digest(data)

    def discard_staged(self) -> None:
        """Forget the staged model file (its round was rolled back): wait for the
        background write so nothing races the next write of that round."""
        if self._staged is not None:
            self._staged[1].result()
            self._staged = None

    def _staging_dir(self, server_round: int) -> Path:
        return self.path / COMMITS / f".{commit_name(server_round)}.tmp"

    def commit(
        self,
        server_round: int,
        arrays: ArrayRecord,
        row: dict[str, Any],
        state: dict[str, Any],
        node_states: dict[int, RecordDict] | None = None,
        stop_reason: str | None = None,
        keep_round: int | None = None,
        model_round: int | None = None,
    ) -> Path:
        """Persist a completed round (see the module docstring for the order of writes).
        `arrays` must be what was passed to `stage` for this round, if it was staged.
        `keep_round` is a round retention must keep (early stopping's best so far);
        `model_round` makes model.safetensors that (kept) round's model instead."""
        try:
            return self._commit(
                server_round, arrays, row, state, node_states, stop_reason, keep_round, model_round
            )
        except OSError as exc:  # the disk is full, read-only, ...: say so, leave no litter
            shutil.rmtree(self._staging_dir(server_round), ignore_errors=True)
            for entry in self.path.glob(f".{MODEL}.*"):
                entry.unlink(missing_ok=True)
            done = [commit_round(c) or 0 for c in self.commit_dirs()]
            raise storage_error(
                exc, f"committing round {server_round} to {self.path}", max(done, default=0)
            ) from exc

    def _commit(
        self,
        server_round: int,
        arrays: ArrayRecord,
        row: dict[str, Any],
        state: dict[str, Any],
        node_states: dict[int, RecordDict] | None,
        stop_reason: str | None,
        keep_round: int | None,
        model_round: int | None,
    ) -> Path:
        staged_round, future = self._staged or (None, None)
        self._staged = None
        if future is not None and staged_round == server_round:
            arrays_digest = future.result()
        else:
            arrays_digest = self._write_arrays(server_round, arrays)
        self._append_history(row)
        pins = {"keep_round": keep_round, "model_round": model_round}
        files = self._state_files(server_round, state, node_states, stop_reason, pins)
        manifest = {
            "format": FORMAT,
            "round": server_round,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": {
                ARRAYS_FILE: arrays_digest,
                **{name: _digest(data) for name, data in files.items()},
            },
            "history": {"bytes": self._history_bytes, "sha256": self._history_hash.hexdigest()},
        }
        manifest["sha256"] = _manifest_digest(manifest)
        final = self._publish(server_round, files, manifest)
        self._pin(keep_round, model_round)
        self._link_model(self._model_commit(final, model_round))
        self._prune()
        return final

    def _pin(self, *rounds: int | None) -> None:
        self._pinned = {r for r in rounds if r is not None}

    def _model_commit(self, commit: Path, model_round: int | None) -> Path:
        """The commit whose arrays model.safetensors should hold."""
        self.model_round = commit_round(commit)
        if model_round is None:
            return commit
        chosen = commit.parent / commit_name(model_round)
        if not (chosen / ARRAYS_FILE).is_file():
            log.warning(
                "round %d is no longer kept; model.safetensors is the last round's", model_round
            )
            return commit
        self.model_round = model_round
        return chosen

    def _state_files(
        self,
        server_round: int,
        state: dict[str, Any],
        node_states: dict[int, RecordDict] | None,
        stop_reason: str | None,
        pins: dict[str, int | None],
    ) -> dict[str, bytes]:
        """state.json, plus state.safetensors and nodes.safetensors when there is content."""
        from safetensors.numpy import save

        document, state_arrays = encode_state(state)
        state_json = {
            "format": FORMAT,
            "round": server_round,
            "stop_reason": stop_reason,
            "experiment": experiment_identity(self.cfg),
            "components": document,
            **{name: value for name, value in pins.items() if value is not None},
        }
        files = {STATE_FILE: json.dumps(state_json, sort_keys=True).encode()}
        if state_arrays:
            files[STATE_ARRAYS_FILE] = save(state_arrays)
        if node_states:
            payload = {
                str(n): np.frombuffer(recorddict_to_bytes(r), dtype=np.uint8)
                for n, r in sorted(node_states.items())
            }
            files[NODES_FILE] = save(payload)
        return files

    def _append_history(self, row: dict[str, Any]) -> None:
        line = (json.dumps(row, sort_keys=True) + "\n").encode()
        with open(self.path / HISTORY, "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self._history_hash.update(line)
        self._history_bytes += len(line)
        self._rows.append(row)

    def _publish(self, server_round: int, files: dict[str, bytes], manifest: dict) -> Path:
        """Complete the staging folder (which holds the model file) and rename it into
        place: the atomic step that makes the commit exist."""
        root = self.path / COMMITS
        final = root / commit_name(server_round)
        if final.exists():
            raise FedmlError(f"{final} already exists; the run directory was changed meanwhile.")
        staging = self._staging_dir(server_round)
        for name, data in files.items():
            _write_synced(staging / name, data)
        _write_synced(staging / MANIFEST, json.dumps(manifest, indent=1).encode())
        fsync_dir(staging)
        os.rename(staging, final)
        fsync_dir(root)
        return final

    def _link_model(self, commit: Path) -> None:
        """Point model.safetensors at the commit's arrays: a hard link swapped in
        atomically (a copy on file systems without hard links). The directory is not
        fsynced: after a power cut the link may be one round old, and resume relinks it
        from the commit, which is what is durable."""
        source, target = commit / ARRAYS_FILE, self.path / MODEL
        if target.exists() and os.path.samefile(source, target):
            return  # already linked (renaming a link onto itself would do nothing)
        staging = self.path / f".{MODEL}.{os.getpid()}.tmp"
        staging.unlink(missing_ok=True)
        try:
            os.link(source, staging)
        except OSError:
            atomic_write(target, source.read_bytes())
            return
        os.replace(staging, target)

    def kept_rounds(self, committed: list[int]) -> set[int]:
        """The newest `checkpoint.keep` rounds of `committed`, the best one, and the
        pinned ones."""
        keep = set(sorted(committed)[-self.cfg.checkpoint.keep :]) | self._pinned
        best = self.best_row([r for r in self._rows if r.get("round") in set(committed)])
        if best is not None:
            keep.add(best["round"])
        return keep

    def best_row(self, rows: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
        monitor = Monitor(self.cfg.checkpoint.monitor, self.cfg.checkpoint.mode)
        return monitor.best(self._rows if rows is None else rows)

    def _prune(self) -> None:
        """Rename commits no longer kept out of the way (instant), then delete them in
        the background: freeing a large model's blocks is not on the round's clock.
        A crash mid-delete leaves `.prune-*` folders that resume removes."""
        commits = {commit_round(p): p for p in self.commit_dirs()}
        keep = self.kept_rounds([r for r in commits if r is not None])
        doomed = []
        for server_round, commit in commits.items():
            if server_round not in keep:
                doomed.append(commit.with_name(f".prune-{commit.name}"))
                os.rename(commit, doomed[-1])
        if doomed:
            self._submit(_delete_all, doomed)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._background is None:
            self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runstore")
        return self._background.submit(fn, *args)

    def close(self) -> None:
        """Finish background work (a staged model file, deletions of pruned commits),
        stop the worker and release the directory lock."""
        if self._background is not None:
            self._background.shutdown(wait=True)
            self._background = None
        self._unlock()

    # -- one writer at a time -----------------------------------------------------------
    def _lock(self) -> None:
        """Hold an exclusive lock on DIR/.lock while this process writes the run. The
        operating system drops it when the process ends, however it ends."""
        if (self.path / LOCK).exists() and not (self.path / LOCK).is_file():
            raise FedmlError(
                f"{self.path / LOCK} is not fedml's lock file (a folder or another kind of "
                "file took its place). Remove it, then run the command again."
            )
        handle = open(self.path / LOCK, "a+")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise FedmlError(
                f"{self.path} is in use by another fedml process (pid {owner}). Let it "
                "finish or stop it, then resume."
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_handle = handle

    def _unlock(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()  # closing the file releases the lock
            self._lock_handle = None

    # -- reading ------------------------------------------------------------------------
    def history(self) -> list[dict[str, Any]]:
        """All history rows in history.jsonl."""
        lines = (self.path / HISTORY).read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    @property
    def rows(self) -> list[dict[str, Any]]:
        """History rows of this session's view (after `resume` or `commit`)."""
        return list(self._rows)


@dataclass(frozen=True)
class RunStatus:
    """What `fedml runs` reports about one run directory."""

    path: Path
    cfg: RunConfig
    commits: list[CommitCheck]
    rounds_done: int
    last_commit_time: str | None
    stop_reason: str | None
    best: dict[str, Any] | None
    best_metric: str | None
    set_aside: list[str]
    privacy: dict[str, Any] | None  # the newest committed row's "privacy" entry
    rows: list[dict[str, Any]]  # history rows up to the newest intact commit
    model_round: int | None  # the round model.safetensors holds when not the last (best)

    running: bool
    deployed: bool = False  # started by `fedml server`: resumed by it only

    @property
    def resume_command(self) -> str:
        """How to continue this run."""
        if self.deployed:
            return f"fedml server --resume {self.path} --pki PKI_DIR"
        return f"fedml simulate --resume {self.path}"

    @property
    def state(self) -> str:
        """running | finished | interrupted | not started | damaged."""
        if self.running:
            return "running"
        if self.commits and not any(c.problem is None for c in self.commits):
            return "damaged"
        if self.rounds_done == 0:
            return "not started"
        return "finished" if self.stop_reason else "interrupted"


def run_status(path: Path) -> RunStatus:
    """Verify every commit of the run at `path` and summarise it (read-only)."""
    store = RunStore.open(path)
    checks = [store.check(c) for c in store.commit_dirs()]
    intact = [c for c in checks if c.problem is None]
    rounds_done, created, stop_reason, model_round = 0, None, None, None
    if intact:
        newest = intact[-1].path
        rounds_done = intact[-1].round
        created = json.loads((newest / MANIFEST).read_bytes()).get("created")
        state = json.loads((newest / STATE_FILE).read_bytes())
        stop_reason, model_round = state.get("stop_reason"), state.get("model_round")
    committed = {c.round for c in intact}
    monitor = Monitor(store.cfg.checkpoint.monitor, store.cfg.checkpoint.mode)
    rows = [r for r in read_history(path) if r["round"] <= rounds_done]
    best = monitor.best([r for r in rows if r["round"] in committed])
    privacy = next((r["privacy"] for r in reversed(rows) if r.get("privacy")), None)
    damaged_root = path / DAMAGED
    return RunStatus(
        path=path,
        cfg=store.cfg,
        commits=checks,
        rounds_done=rounds_done,
        last_commit_time=created,
        stop_reason=stop_reason,
        best=best,
        best_metric=monitor.name(best) if best else None,
        set_aside=sorted(p.name for p in damaged_root.iterdir()) if damaged_root.is_dir() else [],
        privacy=privacy,
        rows=rows,
        model_round=model_round,
        running=is_locked(path),
        deployed=store.deployed,
    )


def is_locked(path: Path) -> bool:
    """Whether a fedml process holds the run directory's lock right now."""
    if not (path / LOCK).is_file():
        return False
    try:
        handle = open(path / LOCK)  # noqa: SIM115 - closed below
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        handle.close()
    return False


def _read_regular(path: Path) -> bytes | None:
    """The bytes of `path` if it is a regular file (following links), else None."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        return path.read_bytes()
    except OSError:
        return None


def storage_error(exc: OSError, doing: str, last_round: int | None = None) -> FedmlError:
    """One clear error for a file system that refuses a write (full, read-only, no
    permission): what was being done and, during a run, the last intact round."""
    import errno

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


def read_history(path: Path) -> list[dict[str, Any]]:
    """History rows that parse as rows (a damaged tail is skipped, not fatal, for
    reporting: the commits, verified separately, say what is real)."""
    rows = []
    try:
        lines = (path / HISTORY).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            break
        if not isinstance(row, dict) or type(row.get("round")) is not int:
            break
        rows.append(row)
    return rows


def _delete_all(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


class _Damaged(Exception):
    """A commit failed verification (internal: callers get `CommitCheck` or FedmlError)."""


def list_commit_dirs(run_dir: Path) -> list[Path]:
    """The commit directories of the run at `run_dir`, oldest first (names only; not
    verified)."""
    root = run_dir / COMMITS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and commit_round(p) is not None]
    return sorted(found, key=lambda p: commit_round(p) or 0)


def find_runs(path: Path) -> list[Path]:
    """`path` itself when it is a run directory, else the run directories inside it."""
    if (path / CONFIG).is_file():
        return [path]
    runs = sorted(p for p in path.iterdir() if (p / CONFIG).is_file()) if path.is_dir() else []
    if not runs:
        raise FedmlError(
            f"{path} is neither a run directory nor a folder of runs (no {CONFIG} found). "
            "Pass a `fedml simulate --out` directory or its parent (default: runs)."
        )
    return runs


def commit_round(path: Path) -> int | None:
    """The round a commit directory's name says (None for anything else)."""
    name = path.name
    if not name.startswith(COMMIT_PREFIX) or not name[len(COMMIT_PREFIX) :].isdigit():
        return None
    return int(name[len(COMMIT_PREFIX) :])
