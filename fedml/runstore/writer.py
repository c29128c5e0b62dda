"""`RunStore`: the one process that writes a run directory, round by round.

It creates or opens the directory, holds its lock, stages and commits each round in the
crash-safe order the package docstring describes, relinks model.safetensors, prunes
what retention no longer keeps, and prepares the directory for a resume. Which commit to
resume from and which commits to keep are decided in `fedml.runstore.policy`.

Durable writes are called by the names imported here (`write_synced`, `fsync_dir`):
tests/test_kill.py kills the process at chosen calls of them by patching this module.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedml import regular_files
from fedml.config import RunConfig, experiment_identity, resume_config, with_overrides
from fedml.errors import FedmlError
from fedml.records import HistoryRow
from fedml.runstore.files import atomic_write, fsync_dir, storage_error, write_synced
from fedml.runstore.format import (
    ARRAYS_FILE,
    BEST,
    COMMITS,
    CONFIG,
    DAMAGED,
    DEPLOYED,
    FORMAT,
    HISTORY,
    LOCK,
    MANIFEST,
    MODEL,
    NODES_FILE,
    STATE_ARRAYS_FILE,
    STATE_FILE,
    Checkpoint,
    CommitCheck,
    commit_name,
    commit_round,
    encode_arrays,
    file_digest,
    is_deployed,
    list_commit_dirs,
    manifest_digest,
    read_config,
)
from fedml.runstore.policy import (
    best_row,
    covered_history_bytes,
    pruned_commits,
    refuse_existing_run,
    refuse_other_kind,
    refuse_unsafe_resume,
    resume_point,
    set_aside_path,
)
from fedml.statefile import encode_state, recorddict_to_bytes

log = logging.getLogger(__name__)


LOCK_PATIENCE_S = 1.0  # how long a lock held for a moment (`is_locked` looking) may delay us


def _flock_exclusive(handle: IO[str]) -> None:
    """Take the exclusive lock on `handle`, or raise BlockingIOError when another process
    holds it. `is_locked` (a follower polling the run, `fedml runs`) holds a shared lock
    for an instant: a refusal is retried for `LOCK_PATIENCE_S` before it counts."""
    deadline = time.monotonic() + LOCK_PATIENCE_S
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def default_run_path(root: Path = Path("runs")) -> Path:
    """runs/<timestamp>, made unique with a suffix when two runs start the same second."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = root / stamp, 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{n}"
    return path


class RunStore:
    """Reads and writes one run directory."""

    def __init__(self, path: Path, cfg: RunConfig) -> None:
        self.path = path
        self.cfg = cfg
        self._rows: list[HistoryRow] = []
        self._history_hash = hashlib.sha256()
        self._history_bytes = 0
        # One background worker (started on first use, stopped by `close`): writes
        # staged model files, deletes pruned commits.
        self._background: ThreadPoolExecutor | None = None
        self._staged: tuple[int, Future] | None = None
        self._lock_handle: IO[str] | None = None
        self._pinned: set[int] = set()  # rounds kept whatever the retention says
        self.model_round: int | None = None  # the round model.safetensors holds
        # what rebuilds the model (fedml.models.describe_model), written into each model file
        self.model_description: dict[str, Any] | None = None

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, cfg: RunConfig, deployed: bool = False) -> RunStore:
        """Start a new run directory; refuse one that already holds a run. `deployed`:
        its sites are real (`fedml server`), so it resumes only that way (`DEPLOYED`)."""
        refuse_existing_run(path)
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
        return cls(path, read_config(path))

    @property
    def deployed(self) -> bool:
        """Whether `fedml server` started this run (its sites are real)."""
        return is_deployed(self.path)

    # -- commits ------------------------------------------------------------------------
    def commit_dirs(self) -> list[Path]:
        """Commit directories, oldest first (names only; not verified)."""
        return list_commit_dirs(self.path)

    def latest_valid(self) -> tuple[Checkpoint | None, list[CommitCheck]]:
        """The newest intact commit (None when the run has none yet) and the damaged
        commits newer than it. Raises when commits exist but none is intact. Read-only."""
        return resume_point(self.path)

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
        refuse_unsafe_resume(self.path, cfg, checkpoint, damaged)
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
        self._truncate_history(covered_history_bytes(checkpoint))
        if checkpoint is not None:
            self._pin(checkpoint.keep_round, checkpoint.model_round)
            self._link_model(self._model_commit(checkpoint.path, checkpoint.model_round))
        else:
            (self.path / MODEL).unlink(missing_ok=True)
        if cfg.to_toml() != regular_files.read_text(self.path / CONFIG):  # changed, or migrated
            atomic_write(self.path / CONFIG, cfg.to_toml().encode())
        self.cfg = cfg
        self._link_best()  # by the config it goes on with
        return checkpoint, damaged

    def _truncate_history(self, size: int) -> None:
        """Cut history.jsonl back to its first `size` bytes and take them as this
        session's view."""
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
        for entry in [*self.path.glob(f".{MODEL}.*"), *self.path.glob(f".{BEST}.*")]:
            entry.unlink(missing_ok=True)

    def _set_aside(self, commit: Path) -> None:
        target = set_aside_path(self.path, commit)
        target.parent.mkdir(exist_ok=True)
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
        data = encode_arrays(arrays, server_round, self.model_description)
        write_synced(staging / ARRAYS_FILE, data)
        return file_digest(data)

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
        row: HistoryRow,
        state: dict[str, Any],
        node_states: dict[int, RecordDict] | None = None,
        stop_reason: str | None = None,
        keep_round: int | None = None,
        model_round: int | None = None,
    ) -> Path:
        """Persist a completed round (see the package docstring for the order of writes).
        `arrays` must be what was passed to `stage` for this round, if it was staged.
        `keep_round` is a round retention must keep (early stopping's best so far);
        `model_round` makes model.safetensors that (kept) round's model instead."""
        try:
            return self._commit(
                server_round, arrays, row, state, node_states, stop_reason, keep_round, model_round
            )
        except OSError as exc:  # the disk is full, read-only, ...: say so, leave no litter
            shutil.rmtree(self._staging_dir(server_round), ignore_errors=True)
            for entry in [*self.path.glob(f".{MODEL}.*"), *self.path.glob(f".{BEST}.*")]:
                entry.unlink(missing_ok=True)
            done = [commit_round(c) or 0 for c in self.commit_dirs()]
            raise storage_error(
                exc, f"committing round {server_round} to {self.path}", max(done, default=0)
            ) from exc

    def _commit(
        self,
        server_round: int,
        arrays: ArrayRecord,
        row: HistoryRow,
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
                **{name: file_digest(data) for name, data in files.items()},
            },
            "history": {"bytes": self._history_bytes, "sha256": self._history_hash.hexdigest()},
        }
        manifest["sha256"] = manifest_digest(manifest)
        final = self._publish(server_round, files, manifest)
        self._pin(keep_round, model_round)
        self._link_model(self._model_commit(final, model_round))
        self._link_best()
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

    def _append_history(self, row: HistoryRow) -> None:
        line = (json.dumps(row, sort_keys=True) + "\n").encode()
        write_synced(self.path / HISTORY, line, append=True)
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
            write_synced(staging / name, data)
        write_synced(staging / MANIFEST, json.dumps(manifest, indent=1).encode())
        fsync_dir(staging)
        os.rename(staging, final)
        fsync_dir(root)
        return final

    def _link_best(self) -> None:
        """Point best.safetensors at the best committed round's arrays by
        `checkpoint.monitor` (validation rows only; retention always keeps that commit);
        none while no committed round has the metric."""
        committed = {commit_round(c) for c in self.commit_dirs()}
        best = best_row(self.cfg.checkpoint, [r for r in self._rows if r["round"] in committed])
        if best is None:
            (self.path / BEST).unlink(missing_ok=True)
            return
        self._link_model(self.path / COMMITS / commit_name(best["round"]), BEST)

    def _link_model(self, commit: Path, name: str = MODEL) -> None:
        """Point model.safetensors (or `name`) at the commit's arrays: a hard link swapped
        in atomically (a copy on file systems without hard links). The directory is not
        fsynced: after a power cut the link may be one round old, and resume relinks it
        from the commit, which is what is durable."""
        source, target = commit / ARRAYS_FILE, self.path / name
        if target.exists() and os.path.samefile(source, target):
            return  # already linked (renaming a link onto itself would do nothing)
        staging = self.path / f".{name}.{os.getpid()}.tmp"
        staging.unlink(missing_ok=True)
        try:
            os.link(source, staging)
        except OSError:
            atomic_write(target, source.read_bytes())
            return
        os.replace(staging, target)

    def _prune(self) -> None:
        """Rename commits no longer kept out of the way (instant), then delete them in
        the background: freeing a large model's blocks is not on the round's clock.
        A crash mid-delete leaves `.prune-*` folders that resume removes."""
        doomed = []
        for commit in pruned_commits(
            self.cfg.checkpoint, self.commit_dirs(), self._rows, self._pinned
        ):
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
            _flock_exclusive(handle)
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
    def history(self) -> list[HistoryRow]:
        """All history rows in history.jsonl."""
        lines = regular_files.read_text(self.path / HISTORY).splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    @property
    def rows(self) -> list[HistoryRow]:
        """History rows of this session's view (after `resume` or `commit`)."""
        return list(self._rows)


def open_resume(
    path: Path, overrides: dict[str, Any], deployed: bool = False
) -> tuple[RunStore, RunConfig]:
    """The run directory at `path` and the config to continue it with: the stored
    config plus the resumable overrides (any other change is refused). `deployed`: the
    caller is `fedml server`; a run continues only the way it started."""
    store = RunStore.open(path)
    refuse_other_kind(path, deployed)
    return store, resume_config(store.cfg, overrides)


def open_run(
    cfg: RunConfig, resume: RunStore | None, deployed: bool
) -> tuple[RunStore, Checkpoint | None]:
    """Where a run plays, decided in one place for every engine: with `resume` (opened
    by `open_resume`) that directory from its newest intact commit; else a new run
    directory at `cfg.out` (default runs/<timestamp>), marked `deployed` for real sites."""
    if resume is not None:
        checkpoint, _ = resume.resume(cfg)
        return resume, checkpoint
    path = Path(cfg.out) if cfg.out else default_run_path()
    return RunStore.create(path, cfg, deployed=deployed), None


def _delete_all(folders: list[Path]) -> None:
    """Delete pruned commits (the background worker's job: it can take a while)."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
