"""The run store: commits round-trip, retention, and every kind of damage at resume."""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from bounded import within
from commit_compare import same_commit
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from fedml.arrays import from_numpy, from_state_dict, to_numpy
from fedml.config import load_config, with_overrides
from fedml.errors import FedmlError
from fedml.runstore import RunStore, read_model, run_status
from fedml.statefile import rng_state


def _cfg(tmp_path: Path, **overrides):
    return load_config(None, {"simulation.clients": 3, "out": str(tmp_path / "run"), **overrides})


def _arrays(value: float) -> ArrayRecord:
    """Arrays in a deliberately unsorted key order, several dtypes, a 0-d buffer."""
    return ArrayRecord(
        {
            "z.weight": from_numpy(np.full((2, 3), value, dtype=np.float32)),
            "a.bias": from_numpy(np.full((3,), value, dtype=np.float64)),
            "bn.num_batches_tracked": from_numpy(np.array(int(value * 10), dtype=np.int64)),
        }
    )


def _row(server_round: int, accuracy: float) -> dict:
    """A history row whose validation accuracy is `accuracy`; its test accuracy runs the
    other way, so a best chosen on the test set would show."""
    return {
        "round": server_round,
        "evaluate": {"accuracy": accuracy, "loss": 1.0 - accuracy},
        "server": {"accuracy": 1.0 - accuracy, "loss": accuracy},
    }


def _run_with_commits(tmp_path: Path, accuracies: list[float], **overrides) -> RunStore:
    store = RunStore.create(tmp_path / "run", _cfg(tmp_path, **overrides))
    for r, acc in enumerate(accuracies, start=1):
        store.commit(r, _arrays(r), _row(r, acc), state={"strategy": {"r": r}})
    store.close()  # as the round loop does when it ends
    return store


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _same_arrays(a: ArrayRecord, b: ArrayRecord) -> bool:
    return list(a.keys()) == list(b.keys()) and all(
        to_numpy(a[k]).dtype == to_numpy(b[k]).dtype
        and to_numpy(a[k]).shape == to_numpy(b[k]).shape
        and to_numpy(a[k]).tobytes() == to_numpy(b[k]).tobytes()
        for k in a
    )


def _resume(tmp_path: Path, **overrides):
    store = RunStore.open(tmp_path / "run")
    return store, store.resume(with_overrides(store.cfg, overrides))


# ---------------------------------------------------------------------------- round trip
def test_a_commit_round_trips_everything_the_loop_needs(tmp_path):
    store = RunStore.create(tmp_path / "run", _cfg(tmp_path))
    rng = random.Random(3)
    rng.random()
    state = {"strategy": {"rng": rng_state(rng), "momentum": np.arange(4.0)}, "x": [1, None]}
    nodes = {2: RecordDict({"ledger": MetricRecord({"epsilon": 0.5, "steps": 12})})}
    store.commit(1, _arrays(1.5), _row(1, 0.5), state=state, node_states=nodes)

    checkpoint = RunStore.open(tmp_path / "run").latest_valid()[0]
    assert checkpoint.round == 1 and checkpoint.stop_reason is None
    assert _same_arrays(checkpoint.arrays, _arrays(1.5))
    assert checkpoint.state["strategy"]["rng"] == json.loads(json.dumps(rng_state(rng)))
    assert checkpoint.state["strategy"]["momentum"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert checkpoint.state["x"] == [1, None]
    assert dict(checkpoint.node_states[2]["ledger"]) == {"epsilon": 0.5, "steps": 12}


def test_model_file_is_the_latest_commit_and_loads_in_plain_torch(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    store = RunStore.create(tmp_path / "run", _cfg(tmp_path))
    store.commit(1, from_state_dict(model.state_dict()), _row(1, 0.1), state={})
    store.commit(2, _arrays(2.0), _row(2, 0.2), state={}, stop_reason="max rounds")
    assert _same_arrays(read_model(tmp_path / "run" / "model.safetensors"), _arrays(2.0))

    (tmp_path / "other").mkdir()
    first = RunStore.create(tmp_path / "other", _cfg(tmp_path))
    first.commit(1, from_state_dict(model.state_dict()), _row(1, 0.1), state={})
    loaded = load_file(tmp_path / "other" / "model.safetensors")
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    fresh.load_state_dict(loaded, strict=True)  # 0-d num_batches_tracked keeps its shape
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_the_same_commit_gives_the_same_bytes(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        RunStore.create(tmp_path / name / "run", _cfg(tmp_path / name)).commit(
            1, _arrays(1.0), _row(1, 0.5), state={"s": [1.5]}
        )
    a, b = (tmp_path / n / "run" / "commits" / "round-000001" for n in "ab")
    assert same_commit(a, b)
    assert sorted(p.name for p in a.iterdir()) == [
        "MANIFEST.json",
        "arrays.safetensors",
        "state.json",
    ]  # no state arrays, no state.safetensors


# ---------------------------------------------------------------------------- retention
@settings(max_examples=25)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=9), st.integers(1, 4))
def test_keeps_the_newest_k_commits_plus_the_best(accuracies, keep):
    with tempfile.TemporaryDirectory() as tmp:
        store = _run_with_commits(Path(tmp), accuracies, **{"checkpoint.keep": keep})
        kept = {int(p.name.split("-")[1]) for p in store.commit_dirs()}
        best = 1 + max(range(len(accuracies)), key=lambda i: (accuracies[i], -i))
        newest = set(range(max(1, len(accuracies) - keep + 1), len(accuracies) + 1))
        assert kept == newest | {best}
        assert not [p for p in (Path(tmp) / "run" / "commits").iterdir() if p.name[0] == "."]


def test_best_follows_the_monitored_metric_and_mode(tmp_path):
    store = _run_with_commits(
        tmp_path,
        [0.9, 0.1, 0.5, 0.6],
        **{"checkpoint.keep": 1, "checkpoint.monitor": "evaluate.loss"},
    )
    # evaluate.loss = 1 - accuracy; "auto" mode minimises a loss: round 1 has the lowest
    assert [p.name for p in store.commit_dirs()] == ["round-000001", "round-000004"]


@settings(max_examples=25)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=8), st.integers(1, 3), st.integers(0, 8))
def test_best_model_file_is_the_best_validation_round_across_a_resume(accuracies, keep, cut):
    """best.safetensors holds the arrays of the round with the best validation accuracy
    (the test accuracy, which runs the other way, is never looked at), and a resume
    from an earlier commit points it at the best of the rounds that commit covers."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        _run_with_commits(Path(tmp), accuracies, **{"checkpoint.keep": keep})
        best = 1 + max(range(len(accuracies)), key=lambda i: (accuracies[i], -i))
        assert _same_arrays(read_model(run / "best.safetensors"), _arrays(best))

        kept = sorted(int(p.name.split("-")[1]) for p in (run / "commits").iterdir())
        back_to = kept[min(cut, len(kept) - 1)]
        for newer in (r for r in kept if r > back_to):  # damaged: resume goes back
            (run / "commits" / f"round-{newer:06d}" / "MANIFEST.json").unlink()
        store, _ = _resume(Path(tmp))
        store.close()
        covered = [r for r in kept if r <= back_to]
        best_kept = max(covered, key=lambda r: (accuracies[r - 1], -r))
        assert _same_arrays(read_model(run / "best.safetensors"), _arrays(best_kept))


def test_a_best_model_chosen_on_the_test_set_is_refused(tmp_path):
    with pytest.raises(FedmlError, match=r"on the test set.*evaluate\.loss"):
        _cfg(tmp_path, **{"checkpoint.monitor": "server.loss"})
    with pytest.raises(FedmlError, match=r"auto, evaluate\.accuracy or train\.loss"):
        _cfg(tmp_path, **{"checkpoint.monitor": "server.auroc"})


def test_no_best_model_file_without_a_validation_metric(tmp_path):
    store = RunStore.create(tmp_path / "run", _cfg(tmp_path))
    store.commit(1, _arrays(1.0), {"round": 1, "server": {"accuracy": 0.9}}, state={})
    store.close()
    assert not (tmp_path / "run" / "best.safetensors").exists()
    assert (tmp_path / "run" / "model.safetensors").exists()


# ---------------------------------------------------------------------------- damage
def _flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


NEWEST = Path("commits/round-000003")
DAMAGE = {
    "truncated arrays": (lambda run: _truncate(run / NEWEST / "arrays.safetensors"), "checksum"),
    "flipped byte in state": (lambda run: _flip_byte(run / NEWEST / "state.json", 10), "checksum"),
    "missing manifest": (lambda run: (run / NEWEST / "MANIFEST.json").unlink(), "is missing"),
    "missing arrays": (lambda run: (run / NEWEST / "arrays.safetensors").unlink(), "missing"),
    "edited manifest": (
        lambda run: (run / NEWEST / "MANIFEST.json").write_text(
            (run / NEWEST / "MANIFEST.json").read_text().replace('"created": "', '"created": "1')
        ),
        "fails its own checksum",
    ),
    "edited last history row": (lambda run: _flip_byte(run / "history.jsonl", -5), "modified"),
    "manifest is a FIFO": (lambda run: _fifo_for(run / NEWEST / "MANIFEST.json"), "is a FIFO"),
}


def _fifo_for(path: Path) -> None:
    """Replace the file at `path` by a FIFO: reading it would wait for ever."""
    path.unlink()
    os.mkfifo(path)


def test_a_fifo_for_history_makes_every_commit_damaged_not_a_hang(tmp_path):
    """Issue 34: `fedml runs` and --resume hung on a history.jsonl that is a FIFO."""
    _run_with_commits(tmp_path, [0.1, 0.2])
    _fifo_for(tmp_path / "run" / "history.jsonl")
    status = within(20, lambda: run_status(tmp_path / "run"))
    assert status.rounds_done == 0 and all("is a FIFO" in c.problem for c in status.commits)
    with pytest.raises(FedmlError, match=r"No intact commit"):
        within(20, lambda: _resume(tmp_path))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_commit_falls_back_to_the_previous_and_says_so(tmp_path, caplog, damage):
    _run_with_commits(tmp_path, [0.1, 0.2, 0.3])
    run = tmp_path / "run"
    harm, problem = DAMAGE[damage]
    harm(run)
    with caplog.at_level(logging.WARNING, logger="fedml.runstore"):
        store, (checkpoint, damaged) = within(60, lambda: _resume(tmp_path))
    assert checkpoint.round == 2
    assert [c.path.name for c in damaged] == ["round-000003"] and problem in damaged[0].problem
    assert "round-000003 is damaged" in caplog.text and "resuming from round 2" in caplog.text
    assert (run / "damaged" / "round-000003").is_dir()
    assert [r["round"] for r in store.history()] == [1, 2]
    assert _same_arrays(read_model(run / "model.safetensors"), _arrays(2))
    # the run continues from there and commits round 3 again
    store.commit(3, _arrays(3.5), _row(3, 0.35), state={})
    assert [r["round"] for r in store.history()] == [1, 2, 3]
    assert store.latest_valid()[0].round == 3


@pytest.mark.parametrize(
    "harm",
    [
        lambda run: [_flip_byte(p) for p in run.glob("commits/*/arrays.safetensors")],
        lambda run: (run / "history.jsonl").write_bytes(b""),
        lambda run: [p.unlink() for p in run.glob("commits/*/MANIFEST.json")],
    ],
    ids=["every arrays file flipped", "history emptied", "every manifest missing"],
)
def test_no_intact_commit_is_a_clear_error_that_changes_nothing(tmp_path, harm):
    _run_with_commits(tmp_path, [0.1, 0.2, 0.3])
    run = tmp_path / "run"
    harm(run)
    before = _snapshot(run)
    with pytest.raises(FedmlError, match=r"No intact commit .* Nothing was changed"):
        _resume(tmp_path)
    assert _snapshot(run) == before


def test_a_changed_experiment_in_config_toml_is_refused_and_changes_nothing(tmp_path):
    _run_with_commits(tmp_path, [0.1, 0.2])
    config = tmp_path / "run" / "config.toml"
    config.write_text(config.read_text().replace('dataset = "digits"', 'dataset = "breast-cancer"'))
    before = _snapshot(tmp_path / "run")
    with pytest.raises(FedmlError, match=r"data.dataset: 'digits' -> 'breast-cancer'"):
        _resume(tmp_path)
    assert _snapshot(tmp_path / "run") == before


def test_lowering_rounds_below_what_is_committed_is_refused(tmp_path):
    _run_with_commits(tmp_path, [0.1, 0.2, 0.3])
    with pytest.raises(FedmlError, match="already has 3 committed rounds"):
        _resume(tmp_path, rounds=2)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(FedmlError, match="not a fedml run directory"):
        RunStore.open(tmp_path)
    with pytest.raises(FedmlError, match="does not exist"):
        RunStore.open(tmp_path / "nowhere")


def test_resume_cleans_what_a_crash_leaves_behind(tmp_path):
    store = _run_with_commits(tmp_path, [0.1, 0.2])
    run = tmp_path / "run"
    # killed in round 3: row appended, commit half-written; an earlier prune half-done
    with open(run / "history.jsonl", "a") as handle:
        handle.write(json.dumps(_row(3, 0.3)) + "\n")
    (run / "commits" / ".round-000003.tmp").mkdir()
    (run / "commits" / ".round-000003.tmp" / "arrays.safetensors").write_bytes(b"half")
    (run / "commits" / ".prune-round-000000").mkdir()
    (run / ".model.safetensors.123.tmp").write_bytes(b"x")
    del store
    store, (checkpoint, damaged) = _resume(tmp_path)
    assert checkpoint.round == 2 and damaged == []
    assert [r["round"] for r in store.history()] == [1, 2]
    assert sorted(p.name for p in (run / "commits").iterdir()) == ["round-000001", "round-000002"]
    assert not list(run.glob(".model*"))


def test_a_run_killed_before_its_first_commit_resumes_from_scratch(tmp_path):
    store = RunStore.create(tmp_path / "run", _cfg(tmp_path))
    with open(tmp_path / "run" / "history.jsonl", "a") as handle:
        handle.write(json.dumps(_row(1, 0.3)) + "\n")
    del store
    store, (checkpoint, _) = _resume(tmp_path)
    assert checkpoint is None and store.history() == []


def test_an_existing_run_is_never_overwritten_by_create(tmp_path):
    _run_with_commits(tmp_path, [0.1])
    with pytest.raises(FedmlError, match="already holds a run"):
        RunStore.create(tmp_path / "run", _cfg(tmp_path))


def test_one_writer_at_a_time(tmp_path):
    _run_with_commits(tmp_path, [0.1, 0.2])
    first, _ = _resume(tmp_path)
    assert run_status(tmp_path / "run").state == "running"
    with pytest.raises(FedmlError, match=r"in use by another fedml process \(pid \d+\)"):
        _resume(tmp_path)
    first.close()
    assert run_status(tmp_path / "run").state == "interrupted"
    _resume(tmp_path)[0].close()  # free again


def test_a_run_is_not_refused_because_someone_is_looking_at_its_lock(tmp_path):
    """`is_locked` (the Ray engine and `fedml server` poll it while a run goes on;
    `fedml runs` too) holds a shared lock for an instant: a writer that starts at that
    instant waits it out instead of failing as "in use"."""
    import fcntl
    import threading

    _run_with_commits(tmp_path, [0.1])
    looker = (tmp_path / "run" / ".lock").open("a+")
    fcntl.flock(looker, fcntl.LOCK_SH)  # someone looking, right now
    threading.Timer(0.3, looker.close).start()  # ... who looks away soon after
    store, _ = _resume(tmp_path)
    assert run_status(tmp_path / "run").state == "running"
    store.close()


# ---------------------------------------------------------------------------- status
def test_status_reports_progress_best_and_damage(tmp_path):
    store = _run_with_commits(tmp_path, [0.4, 0.9, 0.5, 0.6], **{"rounds": 6})
    status = run_status(tmp_path / "run")
    assert (status.state, status.rounds_done, status.cfg.rounds) == ("interrupted", 4, 6)
    assert status.best["round"] == 2 and status.best_metric == "evaluate.accuracy"
    assert [c.round for c in status.commits] == [2, 3, 4]

    store.commit(5, _arrays(5), _row(5, 0.7), state={})
    store.commit(6, _arrays(6), _row(6, 0.7), state={}, stop_reason="max rounds")
    _truncate(tmp_path / "run" / "commits" / "round-000006" / "arrays.safetensors")
    status = run_status(tmp_path / "run")
    assert status.rounds_done == 5 and status.state == "interrupted"
    assert [c.round for c in status.commits if c.problem] == [6]

    store, _ = _resume(tmp_path)  # sets the damaged round 6 aside
    store.commit(6, _arrays(6), _row(6, 0.7), state={}, stop_reason="max rounds")
    assert run_status(tmp_path / "run").state == "running"  # the store still holds the lock
    store.close()
    status = run_status(tmp_path / "run")
    assert (status.state, status.stop_reason) == ("finished", "max rounds")
    assert status.set_aside == ["round-000006"] and not any(c.problem for c in status.commits)


def test_config_and_node_records_are_plain_flower_records(tmp_path):
    """Per-node state holds any Flower record type (what a ClientApp may keep)."""
    store = RunStore.create(tmp_path / "run", _cfg(tmp_path))
    state = RecordDict(
        {
            "c": ConfigRecord({"k": "v"}),
            "a": ArrayRecord({"x": from_numpy(np.ones(2, dtype=np.float32))}),
        }
    )
    store.commit(1, _arrays(1), _row(1, 0.1), state={}, node_states={1: state, 3: state})
    nodes = store.latest_valid()[0].node_states
    assert sorted(nodes) == [1, 3] and dict(nodes[3]["c"]) == {"k": "v"}


# ------------------------------------------------------------------------ a full disk
def test_a_full_disk_at_a_commit_is_one_clear_error_and_the_run_resumes_after(
    tmp_path, monkeypatch
):
    """ENOSPC while round 2's files are written: a FedmlError naming the last intact
    round, no temporary file left, and once space is back the run continues."""
    import errno

    import fedml.runstore.writer as writer

    store = RunStore.create(tmp_path / "run", _cfg(tmp_path))
    store.commit(1, _arrays(1), _row(1, 0.5), state={"strategy": {"r": 1}})
    real_write = writer.write_synced

    def full_disk(path: Path, data: bytes, *, append: bool = False) -> None:
        if ".round-000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data, append=append)

    monkeypatch.setattr(writer, "write_synced", full_disk)
    store.stage(2, _arrays(2))  # the model file is written in the background, as in a run
    with pytest.raises(FedmlError) as error:
        store.commit(2, _arrays(2), _row(2, 0.6), state={"strategy": {"r": 2}})
    store.close()
    message = str(error.value)
    assert message.startswith("No space left on the device while committing round 2")
    assert "The last intact round is 1" in message and "--resume" in message
    leftovers = [p.name for p in (tmp_path / "run").rglob(".*")]
    assert leftovers == [] or all(name == ".lock" for name in leftovers), leftovers

    monkeypatch.setattr(writer, "write_synced", real_write)  # space is back
    store, (checkpoint, damaged) = _resume(tmp_path)
    assert checkpoint.round == 1 and damaged == []
    assert [row["round"] for row in store.rows] == [1]  # round 2's row was cut back
    store.commit(2, _arrays(2), _row(2, 0.6), state={"strategy": {"r": 2}})
    store.close()
    assert run_status(tmp_path / "run").rounds_done == 2


@pytest.fixture
def tiny_disk(tmp_path):
    """A 400 KB file system of its own (tmpfs), where this machine allows mounting one."""
    import subprocess

    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)],
        capture_output=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_is_one_clear_error_and_the_run_resumes_once_space_is_back(tiny_disk):
    import subprocess
    import sys

    def fedml(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "fedml.cli", *args], capture_output=True, text=True,
            timeout=300, check=False, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
        )  # fmt: skip

    run = tiny_disk / "run"
    common = ["--model", "mlp", "--clients", "3", "--local-epochs", "1", "--no-report"]
    assert fedml("simulate", *common, "--rounds", "5", "--out", str(run)).returncode == 0
    free = os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize
    (tiny_disk / "filler").write_bytes(b"\0" * (free - 16_000))  # less than a commit
    failed = fedml("simulate", "--resume", str(run), "--rounds", "8")
    message = " ".join(failed.stderr.split())
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    assert "No space left on the device while committing round 6" in message
    assert "The last intact round is 5" in message
    assert not list((run / "commits").glob(".*"))  # no half-written commit left
    (tiny_disk / "filler").unlink()
    resumed = fedml("simulate", "--resume", str(run), "--rounds", "8", "--no-report")
    assert resumed.returncode == 0, resumed.stderr
    assert run_status(run).rounds_done == 8


# ------------------------------------------------- hand-made damage with valid checksums
def _reseal(commit: Path, edit) -> None:
    """Let `edit(manifest)` change a commit's manifest (and files), then recompute every
    checksum, as someone editing a run folder by hand could."""
    from fedml.runstore.format import file_digest, manifest_digest

    manifest = json.loads((commit / "MANIFEST.json").read_bytes())
    edit(manifest)
    if isinstance(manifest.get("files"), dict):
        for name in manifest["files"]:
            path = commit / name
            if path.is_file():
                manifest["files"][name] = file_digest(path.read_bytes())
    manifest["sha256"] = manifest_digest(manifest)
    (commit / "MANIFEST.json").write_text(json.dumps(manifest))


def _bad_state(commit: Path):
    def edit(manifest):
        (commit / "state.json").write_text("[]")

    return edit


def _files_as_list(commit: Path):
    def edit(manifest):
        manifest["files"] = list(manifest["files"])

    return edit


def _history_bytes_as_text(commit: Path):
    def edit(manifest):
        manifest["history"]["bytes"] = "lots"

    return edit


def _a_fifo(commit: Path):
    def edit(manifest):
        os.mkfifo(commit / "pipe")
        manifest["files"]["pipe"] = {"sha256": "0" * 64, "bytes": 0}

    return edit


@pytest.mark.parametrize("damage", [_bad_state, _files_as_list, _history_bytes_as_text, _a_fifo])
def test_a_resealed_commit_with_bad_contents_is_damaged_not_a_traceback(tmp_path, damage):
    _run_with_commits(tmp_path, [0.5, 0.6, 0.7])
    newest = tmp_path / "run" / "commits" / "round-000003"
    _reseal(newest, damage(newest))
    status = run_status(tmp_path / "run")  # never opens the FIFO: it would hang
    assert status.rounds_done == 2
    assert status.commits[-1].problem is not None
    store, (checkpoint, damaged) = _resume(tmp_path)
    store.close()
    assert checkpoint.round == 2 and [c.round for c in damaged] == [3]
    assert (tmp_path / "run" / "damaged" / "round-000003").is_dir()


def test_a_folder_where_the_lock_file_belongs_is_a_clear_error(tmp_path):
    _run_with_commits(tmp_path, [0.5])
    lock = tmp_path / "run" / ".lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()
    assert run_status(tmp_path / "run").running is False
    with pytest.raises(FedmlError, match=r"\.lock is not fedml's lock file"):
        _resume(tmp_path)


def test_rounds_pruned_by_retention_before_a_damaged_commit_are_not_called_lost(tmp_path):
    """keep = 1 leaves commits {1 (the best), 4}; with 4 damaged, resume goes back to 1."""
    _run_with_commits(tmp_path, [0.9, 0.5, 0.6, 0.7], **{"checkpoint.keep": 1})
    commits = sorted(p.name for p in (tmp_path / "run" / "commits").iterdir())
    assert commits == ["round-000001", "round-000004"]
    (tmp_path / "run" / "commits" / "round-000004" / "state.json").write_text("{}")
    store, (checkpoint, damaged) = _resume(tmp_path)
    store.close()
    assert checkpoint.round == 1 and [c.round for c in damaged] == [4]


def test_a_run_whose_commits_were_deleted_is_damaged_not_not_started(tmp_path):
    """Issue 34: `fedml runs` said "not started" for a run whose commits/ was deleted
    while its history held 4 rounds."""
    import shutil
    import subprocess
    import sys

    store = _run_with_commits(tmp_path, [0.1, 0.2, 0.3, 0.4])
    store.close()
    shutil.rmtree(tmp_path / "run" / "commits")
    status = run_status(tmp_path / "run")
    assert (status.state, status.rounds_done, status.history_rounds) == ("damaged", 0, 4)
    shown = subprocess.run(
        [sys.executable, "-m", "fedml.cli", "runs", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    text = " ".join(shown.stdout.split())
    assert shown.returncode == 0 and "damaged" in text and "records 4 round(s)" in text, text


def test_a_run_whose_best_model_was_chosen_on_the_test_set_still_opens_and_resumes(
    tmp_path, caplog
):
    """A run made before `server.*` was refused keeps loading: its best model is chosen
    on validation rows from now on, and a resume writes that into its config."""
    store = RunStore.create(tmp_path / "run", _cfg(tmp_path))
    store.commit(1, _arrays(1.0), _row(1, 0.5), state={})
    store.close()
    config = tmp_path / "run" / "config.toml"
    config.write_text(config.read_text().replace('monitor = "auto"', 'monitor = "server.loss"'))
    with caplog.at_level(logging.WARNING):
        status = run_status(tmp_path / "run")
    assert status.cfg.checkpoint.monitor == "auto" and status.best["round"] == 1
    assert "chose the best model on the test set" in caplog.text
    resumed, _ = _resume(tmp_path)
    resumed.close()
    assert 'monitor = "auto"' in config.read_text()
