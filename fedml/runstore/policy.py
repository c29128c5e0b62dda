"""What the run store decides, apart from how it writes: the resume policy and retention.

Resume: continue from the newest intact commit, set newer damaged ones aside, cut
history.jsonl back to what that commit covers, and refuse (changing nothing) whenever
that would mix experiments or lose rounds. Retention: which commits a run keeps after
each round. These functions only read the run directory; `RunStore` acts on what they
decide.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedml import regular_files
from fedml.config import CheckpointConfig, RunConfig, experiment_identity, identity_changes
from fedml.errors import FedmlError
from fedml.monitor import Monitor
from fedml.records import HistoryRow
from fedml.runstore.format import (
    COMMIT_PREFIX,
    COMMITS,
    CONFIG,
    DAMAGED,
    HISTORY,
    MANIFEST,
    Checkpoint,
    CommitCheck,
    DamagedCommit,
    commit_round,
    is_deployed,
    list_commit_dirs,
    load_commit,
    read_history,
    resume_command,
)


# ------------------------------------------------------------------------ resume
def refuse_existing_run(run_dir: Path) -> None:
    """One error when `run_dir` already holds a run (its config or any commit), naming
    the command that continues it: a new run never writes into an old one."""
    if (run_dir / CONFIG).exists() or any((run_dir / COMMITS).glob(f"{COMMIT_PREFIX}*")):
        raise FedmlError(
            f"{run_dir} already holds a run. Continue it with `{resume_command(run_dir)}`, "
            "or choose another --out directory."
        )


def refuse_other_kind(run_dir: Path, deployed: bool) -> None:
    """A run continues only the way it started: with real sites (`fedml server`) or
    with simulated clients (`fedml simulate`), never silently as the other."""
    if is_deployed(run_dir) and not deployed:
        raise FedmlError(
            f"{run_dir} was started by `fedml server` with real sites; resuming it as a "
            f"simulation would train on other data. Continue it with "
            f"`{resume_command(run_dir)}`."
        )
    if deployed and not is_deployed(run_dir):
        raise FedmlError(
            f"{run_dir} is a simulation (fedml simulate); continue it with "
            f"`{resume_command(run_dir)}`, or start a new deployed run with `fedml server "
            "--out DIR`."
        )


def resume_point(run_dir: Path) -> tuple[Checkpoint | None, list[CommitCheck]]:
    """The newest intact commit (None when the run has none yet) and the damaged
    commits newer than it. Raises when commits exist but none is intact. Read-only."""
    damaged: list[CommitCheck] = []
    for commit in reversed(list_commit_dirs(run_dir)):
        try:
            return load_commit(run_dir, commit), damaged
        except DamagedCommit as exc:
            damaged.append(CommitCheck(commit, commit_round(commit) or 0, str(exc)))
    if damaged:
        details = "; ".join(f"{c.path.name}: {c.problem}" for c in damaged)
        raise FedmlError(
            f"No intact commit in {run_dir / COMMITS} ({details}). Nothing was changed. "
            "Restore the run directory from a backup, or start a new run."
        )
    return None, damaged


def refuse_unsafe_resume(
    run_dir: Path, cfg: RunConfig, checkpoint: Checkpoint | None, damaged: list[CommitCheck]
) -> None:
    """Raise (the directory unchanged) when continuing the run at `run_dir` with `cfg`
    from `checkpoint` would mix experiments or discard committed rounds."""
    done = checkpoint.round if checkpoint else 0
    if checkpoint is not None:
        changes = identity_changes(checkpoint.experiment, experiment_identity(cfg))
        if changes:
            raise FedmlError(
                f"{run_dir / CONFIG} no longer matches the experiment its commits were "
                f"made with ({'; '.join(changes)}). Nothing was changed. Put the committed "
                "values back, or start a new run."
            )
    if cfg.rounds < done:
        raise FedmlError(
            f"{run_dir} already has {done} committed rounds; rounds = {cfg.rounds} would "
            f"discard some. Pass --rounds {done} or more (more extends the run)."
        )
    _refuse_lost_rounds(run_dir, done, damaged)


def _refuse_lost_rounds(run_dir: Path, done: int, damaged: list[CommitCheck]) -> None:
    """Resuming cuts history.jsonl back to the newest intact commit (round `done`).
    A crash leaves at most one row past the newest commit folder (the round whose
    commit was being written); damaged commits are kept in damaged/, and retention
    prunes only rounds older than the newest commit. Any other row names a round whose
    commit is gone (commits/ deleted or emptied by hand). Cutting it would lose it for
    good: refuse, change nothing."""
    # rounds up to the newest commit folder (intact or damaged) may have been pruned
    # by retention on purpose; beyond it, only the one being committed may lack one
    newest = max([done, *(check.round for check in damaged)])
    lost = sorted(r["round"] for r in read_history(run_dir) if r["round"] > newest + 1)
    if lost:
        intact = f"round {done}" if done else "none"
        raise FedmlError(
            f"{run_dir / HISTORY} holds rounds up to {lost[-1]}, but no commit in "
            f"{run_dir / COMMITS} holds rounds {lost[0]}..{lost[-1]} (newest intact "
            f"commit: {intact}); were commits deleted? Resuming would discard those "
            "rounds, so nothing was changed. Restore commits/ from a backup, or start "
            "afresh in a new directory (--out NEW_DIR), which leaves this one as it is."
        )


def covered_history_bytes(checkpoint: Checkpoint | None) -> int:
    """How much of history.jsonl `checkpoint` covers: resume truncates it to that."""
    if checkpoint is None:
        return 0
    manifest = json.loads(regular_files.read_bytes(checkpoint.path / MANIFEST))
    return manifest["history"]["bytes"]


def set_aside_path(run_dir: Path, commit: Path) -> Path:
    """Where a damaged commit goes: damaged/NAME, or NAME-2, NAME-3, ... when taken."""
    target_root = run_dir / DAMAGED
    target, n = target_root / commit.name, 1
    while target.exists():
        n += 1
        target = target_root / f"{commit.name}-{n}"
    return target


# ------------------------------------------------------------------------ retention
def kept_rounds(
    retention: CheckpointConfig,
    committed: list[int],
    rows: list[HistoryRow],
    pinned: set[int],
) -> set[int]:
    """The newest `retention.keep` rounds of `committed`, the best one by
    `retention.monitor` (judged on `rows`), and the `pinned` ones."""
    keep = set(sorted(committed)[-retention.keep :]) | pinned
    best = best_row(retention, [r for r in rows if r.get("round") in set(committed)])
    if best is not None:
        keep.add(best["round"])
    return keep


def best_row(retention: CheckpointConfig, rows: list[HistoryRow]) -> HistoryRow | None:
    """The best of `rows` by `retention.monitor` and `retention.mode`."""
    return Monitor(retention.monitor, retention.mode).best(rows)


def pruned_commits(
    retention: CheckpointConfig,
    commits: list[Path],
    rows: list[HistoryRow],
    pinned: set[int],
) -> list[Path]:
    """The commits of `commits` (oldest first) that retention no longer keeps."""
    by_round = {commit_round(p): p for p in commits}
    keep = kept_rounds(retention, [r for r in by_round if r is not None], rows, pinned)
    return [commit for server_round, commit in by_round.items() if server_round not in keep]
