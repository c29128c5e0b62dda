"""SIGKILL at any moment, resume, repeat: the run ends bit-identical to a straight one.

Each process of a chain is killed at a chosen point (inside training, aggregation,
evaluation, each step of a commit) or at a random moment while rounds are running, and
the next one resumes the same directory. The final history (minus wall times), model
file and last commit must equal those of one uninterrupted run of the same config.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from commit_compare import same_commit

KILLER = str(Path(__file__).with_name("killer.py"))
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
FEDML = [sys.executable, "-m", "fedml.cli"]
WAIT_S = 120  # bound on every wait for a child process

# (function, n, before/after): the n-th call in the process that is killed.
# 4 clients, half sampled per round: 2 train_local calls, 2 federated evaluations,
# 1 aggregated reply (FedAvg drops the straggler). A commit makes 4 synced writes:
# arrays, history row, state.json, manifest. The run store's writes are patched in
# fedml.runstore.writer, where RunStore looks them up.
KILL_POINTS = [
    ("clients.app:train_local", 3, "before"),  # training, 2nd round of the process
    ("strategies.aggregate:WeightedMean.add", 2, "after"),  # aggregation
    ("fedml.runstore.writer:write_synced", 3, "after"),  # 1st commit: state.json, no manifest
    ("fedml.runstore.writer:RunStore._append_history", 2, "after"),  # history row, no commit
    ("fedml.runstore.writer:fsync_dir", 2, "after"),  # commit renamed in, model not relinked
    ("clients.app:evaluation_metrics", 3, "before"),  # federated evaluation
    ("fedml.runstore.writer:RunStore._link_model", 2, "before"),  # commit in, model not linked
    ("fedml.runstore.writer:write_synced", 8, "after"),  # 2nd commit: manifest, not renamed in
    ("fedml.runstore.writer:shutil.rmtree", 4, "before"),  # pruning an old commit
    ("fedml.server:CentralEvaluator.__call__", 2, "before"),  # centralised evaluation
]


def _args(out: Path, rounds: int, strategy: str, *extra: str) -> list[str]:
    return [
        "simulate",
        "--rounds", str(rounds),
        "--clients", "4",
        "--fraction-train", "0.5",
        "--stragglers", "0.5",
        "--local-epochs", "1",
        "--strategy", strategy,
        "--seed", "7",
        "--out", str(out),
        *extra,
    ]  # fmt: skip


def _resume_args(out: Path) -> list[str]:
    return ["simulate", "--resume", str(out)]


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, err


def _rounds_logged(out: Path) -> int:
    try:
        return len((out / "history.jsonl").read_bytes().splitlines())
    except OSError:
        return 0


def _next_command(out: Path, first: list[str]) -> list[str]:
    """Resume once the run directory exists; before that, start the run again."""
    return [*FEDML, *_resume_args(out)] if (out / "config.toml").exists() else first


def _kill_at_point(out: Path, first: list[str], point: tuple[str, int, str]) -> int:
    target, n, when = point
    command = _next_command(out, first)
    process = _start([sys.executable, KILLER, target, str(n), when, "--", *command[3:]])
    code, err = _finish(process)
    assert code in (-signal.SIGKILL, 0), err
    return code


def _wait_for_rows(out: Path, rows: int, process: subprocess.Popen) -> bool:
    """Wait (bounded) until history.jsonl has `rows` rows; False if the process ended."""
    deadline = time.monotonic() + WAIT_S
    while _rounds_logged(out) < rows:
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, "no round was logged in time"
        time.sleep(0.002)
    return True


def _kill_at_random(out: Path, first: list[str], rng: random.Random) -> int:
    """Kill at a random instant within about one round, once the process has logged two
    new rounds (the gap between them is its round time): somewhere in the round loop,
    at no chosen point."""
    before = _rounds_logged(out)
    process = _start(_next_command(out, first))
    try:
        if _wait_for_rows(out, before + 1, process):
            logged = time.monotonic()
            if _wait_for_rows(out, before + 2, process):
                time.sleep(rng.uniform(0.0, 1.2) * (time.monotonic() - logged))
                process.send_signal(signal.SIGKILL)
    finally:
        code, err = _finish(process)
    assert code in (-signal.SIGKILL, 0), err
    return code


def _metrics(out: Path) -> list[dict]:
    """History rows without wall-clock times (the round's, and its secure phase's)."""
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds", None)
        row.get("secagg", {}).pop("seconds", None)
    return rows


def _check_identical(straight: Path, resumed: Path, rounds: int) -> None:
    assert len(_metrics(straight)) == rounds
    assert _metrics(resumed) == _metrics(straight)
    model = "model.safetensors"
    assert (resumed / model).read_bytes() == (straight / model).read_bytes()
    last = f"commits/round-{rounds:06d}"
    assert same_commit(resumed / last, straight / last)
    # a crash leaves no damaged commit and nothing half-written behind the final run
    assert not (resumed / "damaged").exists()
    assert not [p for p in (resumed / "commits").iterdir() if p.name.startswith(".")]


def _run_chain(
    tmp_path: Path, rounds: int, strategy: str, plan: list, extra: tuple[str, ...] = ()
) -> list[int]:
    straight_out, out = tmp_path / "straight", tmp_path / "resumed"
    straight = _start([*FEDML, *_args(straight_out, rounds, strategy, *extra)])
    first = [*FEDML, *_args(out, rounds, strategy, *extra)]
    rng = random.Random(f"{strategy}-{rounds}")
    codes = []
    try:
        for step in plan:
            if step == "random":
                codes.append(_kill_at_random(out, first, rng))
            else:
                codes.append(_kill_at_point(out, first, step))
        code, err = _finish(_start(_next_command(out, first)))
        assert code == 0, err
    finally:
        code, err = _finish(straight)
    assert code == 0, err
    _check_identical(straight_out, out, rounds)
    return codes


def test_killed_at_ten_points_and_resumed_ends_bit_identical(tmp_path):
    plan = [KILL_POINTS[0], "random", *KILL_POINTS[1:], "random"]
    codes = _run_chain(tmp_path, rounds=16, strategy="fedavg", plan=plan)
    # every chosen point was reached: those processes died by SIGKILL
    targeted = [codes[0], *codes[2:-1]]
    assert targeted == [-signal.SIGKILL] * len(KILL_POINTS), codes


def test_secure_rounds_killed_mid_protocol_resume_bit_identical(tmp_path):
    """SIGKILL between secure aggregation's exchanges: after a site shared, while sites
    mask, before the server unmasks; the resumed run replays those rounds exactly."""
    plan = [
        ("clients.secagg:share", 3, "after"),
        ("clients.secagg:masked_update", 4, "before"),
        ("fedml.secagg.protocol:ServerSecAgg.unmask", 2, "before"),
        "random",
    ]
    codes = _run_chain(tmp_path, rounds=6, strategy="fedprox", plan=plan, extra=("--secagg",))
    assert codes[:3] == [-signal.SIGKILL] * 3, codes


@pytest.mark.slow
def test_killed_at_many_random_moments_and_resumed_ends_bit_identical(tmp_path):
    """Moments no one chose (the chosen points are the test above's, under FedAvg)."""
    codes = _run_chain(tmp_path, rounds=40, strategy="fedprox", plan=["random"] * 16)
    assert codes.count(-signal.SIGKILL) >= 12, codes
