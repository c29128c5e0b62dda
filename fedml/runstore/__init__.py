"""The run directory: config, history, latest model, and one atomic commit per round.

Layout (a public format, documented in README):

    config.toml              the resolved RunConfig
    history.jsonl            one JSON object per completed round (append-only)
    model.safetensors        the run's global model: a hard link to the latest commit's
                             arrays, or, once early stopping ended the run with
                             `stop.restore_best`, to the best round's
    best.safetensors         a hard link to the arrays of the best committed round by
                             `checkpoint.monitor` (validation rows only; relinked
                             with every commit and at resume)
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

The modules, each importing only those above it:

    format    the format itself: file names, commit names, digests, model encoding,
              reading the history, and verifying and decoding one commit
    files     durable writes (`write_synced`, `atomic_write`, `fsync_dir`) and
              `storage_error` for a disk that refuses them
    policy    decisions, read-only: which commit a resume continues from, when a resume
              is refused, and which commits retention keeps
    status    the read-only view (`run_status`, `is_locked`) for `fedml runs` and reports
    writer    `RunStore`, the one process writing a run: create/open, lock, stage,
              commit, relink the model, prune, resume

This package re-exports what the rest of fedml uses, so `from fedml.runstore import X`
is the way in.
"""

from fedml.runstore.files import atomic_write, storage_error
from fedml.runstore.format import (
    CONFIG,
    Checkpoint,
    CommitCheck,
    commit_round,
    find_runs,
    list_commit_dirs,
    newest_stop_reason,
    read_history,
    read_model,
    read_model_description,
)
from fedml.runstore.policy import refuse_existing_run
from fedml.runstore.status import RunStatus, is_locked, run_status
from fedml.runstore.writer import RunStore, default_run_path, open_resume, open_run

__all__ = [
    "CONFIG",
    "Checkpoint",
    "CommitCheck",
    "RunStatus",
    "RunStore",
    "atomic_write",
    "commit_round",
    "default_run_path",
    "find_runs",
    "is_locked",
    "list_commit_dirs",
    "newest_stop_reason",
    "open_resume",
    "open_run",
    "read_history",
    "read_model",
    "read_model_description",
    "refuse_existing_run",
    "run_status",
    "storage_error",
]
