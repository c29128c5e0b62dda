"""The read-only view of a run directory: what `fedml runs` and the report show.

Nothing here writes or takes the lock, so a run can be inspected while it is running.
"""

from __future__ import annotations

import fcntl
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedml import regular_files
from fedml.config import RunConfig
from fedml.monitor import Monitor
from fedml.records import HistoryRow
from fedml.runstore.format import (
    DAMAGED,
    LOCK,
    MANIFEST,
    STATE_FILE,
    CommitCheck,
    check_commit,
    is_deployed,
    list_commit_dirs,
    read_config,
    read_history,
    resume_command,
)


@dataclass(frozen=True)
class RunStatus:
    """What `fedml runs` reports about one run directory."""

    path: Path
    cfg: RunConfig
    commits: list[CommitCheck]
    rounds_done: int
    last_commit_time: str | None
    stop_reason: str | None
    best: HistoryRow | None
    best_metric: str | None
    set_aside: list[str]
    privacy: dict[str, Any] | None  # the newest committed row's "privacy" entry
    rows: list[HistoryRow]  # history rows up to the newest intact commit
    model_round: int | None  # the round model.safetensors holds when not the last (best)

    running: bool
    history_rounds: int = 0  # the last round history.jsonl records, committed or not
    deployed: bool = False  # started by `fedml server`: resumed by it only

    @property
    def resume_command(self) -> str:
        """How to continue this run."""
        return resume_command(self.path)

    @property
    def lost_commits(self) -> bool:
        """History records rounds, yet no commit is left at all (commits/ deleted): the
        run is damaged, not "not started"."""
        return not self.commits and self.history_rounds > 0

    @property
    def state(self) -> str:
        """running | finished | interrupted | not started | damaged."""
        if self.running:
            return "running"
        if self.commits and not any(c.problem is None for c in self.commits):
            return "damaged"
        if self.lost_commits:
            return "damaged"
        if self.rounds_done == 0:
            return "not started"
        return "finished" if self.stop_reason else "interrupted"


def run_status(path: Path) -> RunStatus:
    """Verify every commit of the run at `path` and summarise it (read-only)."""
    cfg = read_config(path)
    checks = [check_commit(path, c) for c in list_commit_dirs(path)]
    intact = [c for c in checks if c.problem is None]
    rounds_done, created, stop_reason, model_round = 0, None, None, None
    if intact:
        newest = intact[-1].path
        rounds_done = intact[-1].round
        created = json.loads(regular_files.read_bytes(newest / MANIFEST)).get("created")
        state = json.loads(regular_files.read_bytes(newest / STATE_FILE))
        stop_reason, model_round = state.get("stop_reason"), state.get("model_round")
    committed = {c.round for c in intact}
    monitor = Monitor(cfg.checkpoint.monitor, cfg.checkpoint.mode)
    recorded = read_history(path)
    rows = [r for r in recorded if r["round"] <= rounds_done]
    best = monitor.best([r for r in rows if r["round"] in committed])
    privacy = next((r["privacy"] for r in reversed(rows) if r.get("privacy")), None)
    damaged_root = path / DAMAGED
    return RunStatus(
        path=path,
        cfg=cfg,
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
        deployed=is_deployed(path),
        history_rounds=max((r["round"] for r in recorded), default=0),
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
