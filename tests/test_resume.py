"""Resume through the round loop and the CLI: the continued run is the uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from commit_compare import same_commit
from flwr.app import ConfigRecord, Message
from flwr.clientapp import ClientApp

from clients import app as fedml_client
from fedml.config import load_config
from fedml.errors import FedmlError
from fedml.runstore import RunStore, open_resume
from fedml.server import Experiment, run_experiment
from simulations.engine import simulate
from simulations.inprocess import InProcessGrid


class Crash(Exception):
    """Stands in for a process dying right after a round was committed."""


def _crash_at(server_round: int):
    def on_round(row):
        if row["round"] == server_round:
            raise Crash

    return on_round


# Every stateful convergence control on at once (early stopping that does not fire
# within 5 rounds, so its state is carried but the run goes the distance).
CONTROLS = {
    "strategy.adaptive_mu": True,
    "strategy.mu_patience": 1,
    "server.momentum": 0.5,
    "client.lr_decay": 0.9,
    "simulation.dropout": 0.2,
    "validation.clip_norm": 5.0,
    "stop.metric": "server.accuracy",
    "stop.patience": 10,
}


def _overrides(tmp_path: Path, name: str, strategy: str = "fedavg", **extra) -> dict:
    """Sampling, stragglers and pruning all on: every RNG and state path is exercised."""
    return {
        **extra,
        "rounds": 5,
        "simulation.clients": 6,
        "strategy.name": strategy,
        "strategy.fraction_train": 0.5,
        "strategy.fraction_evaluate": 0.5,
        "simulation.stragglers": 0.5,
        "client.local_epochs": 1,
        "checkpoint.keep": 2,
        "out": str(tmp_path / name),
    }


def _metrics(run: Path) -> list[dict]:
    """History rows without wall-clock times (the round's, and its secure phase's)."""
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds", None)
        row.get("secagg", {}).pop("seconds", None)
    return rows


def _assert_identical_runs(a: Path, b: Path, histories: bool = True) -> None:
    if histories:
        assert _metrics(a) == _metrics(b)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    last = sorted(p.name for p in (a / "commits").iterdir())[-1]
    assert same_commit(a / "commits" / last, b / "commits" / last)


# Differential privacy: the clients' ledgers (example level) and the wrapper's clip norm,
# accountant and noise RNG (client level) are state that must survive a crash.
SAMPLE_DP = {"dp.mode": "sample", "dp.noise_multiplier": 1.0}
USER_DP = {"dp.mode": "user-adaptive", "dp.noise_multiplier": 0.2, "dp.clip_norm": 0.5}
SECAGG = {"secagg.enabled": True, "validation.clip_norm": 5.0, "simulation.dropout": 0.2}
SECAGG_USER_DP = {"secagg.enabled": True, **USER_DP, "dp.mode": "user-fixed"}
# Personal models (Ditto's whole model, FedPer's head) live in each node's state.
DITTO = {"client.personal": "ditto", "client.ditto_lambda": 0.5}
FEDPER = {"client.personal": "fedper", "secagg.enabled": True, "validation.clip_norm": 5.0}


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [
        ("fedavg", {}),
        ("fedprox", {}),
        ("fedprox", CONTROLS),
        ("fedprox", SAMPLE_DP),
        ("fedavg", USER_DP),
        ("fedprox", SECAGG),
        ("fedprox", SECAGG_USER_DP),
        ("fedavg", DITTO),
        ("fedprox", FEDPER),
        ("scaffold", {"client.momentum": 0.0, **DITTO}),
    ],
)
def test_a_run_resumed_after_each_crash_equals_the_straight_run(tmp_path, strategy, extra):
    straight = simulate(load_config(None, _overrides(tmp_path, "straight", strategy, **extra)))
    assert straight.stop_reason == "max rounds"

    cfg = load_config(None, _overrides(tmp_path, "resumed", strategy, **extra))
    with pytest.raises(Crash):
        simulate(cfg, on_round=_crash_at(1))
    for crash_round in (2, 4):
        store, cfg = open_resume(tmp_path / "resumed", {})
        with pytest.raises(Crash):
            simulate(cfg, on_round=_crash_at(crash_round), resume=store)
    store, cfg = open_resume(tmp_path / "resumed", {})
    summary = simulate(cfg, resume=store)

    assert summary.resumed_from == 4 and summary.rounds == 5
    assert summary.stop_reason == "max rounds"
    _assert_identical_runs(tmp_path / "straight", tmp_path / "resumed")


def test_extending_a_finished_run_equals_running_longer_from_the_start(tmp_path):
    simulate(load_config(None, _overrides(tmp_path, "long")))
    simulate(load_config(None, {**_overrides(tmp_path, "short"), "rounds": 3}))
    store, cfg = open_resume(tmp_path / "short", {"rounds": 5})
    summary = simulate(cfg, resume=store)
    assert summary.resumed_from == 3 and summary.rounds == 5
    assert "rounds = 5" in (tmp_path / "short" / "config.toml").read_text()
    # the history keeps the record that the run had stopped at round 3
    extended = _metrics(tmp_path / "short")
    assert extended[2].pop("stop") == "max rounds"
    assert extended == _metrics(tmp_path / "long")
    _assert_identical_runs(tmp_path / "long", tmp_path / "short", histories=False)


def _counting_client_app() -> ClientApp:
    """fedml's own training, plus a per-node counter kept in Context.state."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        counter = context.state.config_records.get("visits", ConfigRecord({"n": 0}))
        counter["n"] = int(counter["n"]) + 1
        context.state["visits"] = counter
        reply = fedml_client.train(msg, context)
        reply.content["metrics"]["visits"] = counter["n"]
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        return fedml_client.evaluate_global(msg, context)

    return app


def _play(cfg, store, checkpoint=None):
    grid = InProcessGrid(_counting_client_app(), cfg.simulation.clients, cfg.to_flat())
    return run_experiment(grid, Experiment.prepare(cfg), store, checkpoint=checkpoint)


def test_per_node_context_state_resumes_too(tmp_path):
    overrides = {
        "simulation.clients": 3,
        "client.local_epochs": 1,
        "strategy.fraction_evaluate": 0.0,
        "out": str(tmp_path / "run"),
    }
    cfg = load_config(None, {**overrides, "rounds": 2})
    _play(cfg, RunStore.create(tmp_path / "run", cfg))
    store, cfg = open_resume(tmp_path / "run", {"rounds": 4})
    checkpoint, _ = store.resume(cfg)
    assert {n: int(s["visits"]["n"]) for n, s in checkpoint.node_states.items()} == {
        1: 2,
        2: 2,
        3: 2,
    }
    summary = _play(cfg, store, checkpoint)
    # every node trained in every round: the 4th visit, not a restarted count of 2
    assert summary.history[-1]["train"]["visits"] == 4.0


# ---------------------------------------------------------------------------- the CLI
FEDML = [sys.executable, "-m", "fedml.cli"]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "150"}


def _fedml(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDML, *args], capture_output=True, text=True, timeout=300, env=ENV)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "run"
    result = _fedml(
        "simulate", "--rounds", "2", "--clients", "3", "--local-epochs", "1", "--out", str(run)
    )
    assert result.returncode == 0, result.stderr
    return run


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--lr", "0.5"], "client.lr: 0.1 -> 0.5"),
        (["--strategy", "fedprox", "--seed", "3"], "seed: 0 -> 3; strategy.name: 'fedavg'"),
        (["--rounds", "1"], "already has 2 committed rounds"),
        (["--out", "/tmp/elsewhere"], "drop --out"),
        (["digits-fedavg"], "drop the CONFIG argument"),
    ],
)
def test_resume_refuses_changes_to_the_experiment(finished_run, args, fragment):
    before = (finished_run / "history.jsonl").read_bytes()
    result = _fedml("simulate", "--resume", str(finished_run), *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert fragment in " ".join(result.stderr.split())
    assert (finished_run / "history.jsonl").read_bytes() == before


def test_resuming_a_finished_run_does_nothing_and_succeeds(finished_run):
    before = (finished_run / "history.jsonl").read_bytes()
    result = _fedml("simulate", "--resume", str(finished_run), "--clients", "3")
    assert result.returncode == 0, result.stderr
    assert "resumed after" in result.stdout and "max rounds" in result.stdout
    assert (finished_run / "history.jsonl").read_bytes() == before


def test_runs_shows_one_run_and_a_folder_of_runs(finished_run):
    result = _fedml("runs", str(finished_run))
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "finished (max rounds)" in text and "2 of 2" in text
    rows = [json.loads(line) for line in (finished_run / "history.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda r: (r["evaluate"]["accuracy"], -r["round"]))
    expected = f"round {best['round']}: evaluate.accuracy {best['evaluate']['accuracy']:.4f}"
    assert f"best round │ {expected}" in text
    best_commit = finished_run / "commits" / f"round-{best['round']:06d}" / "arrays.safetensors"
    assert (finished_run / "best.safetensors").read_bytes() == best_commit.read_bytes()

    table = _fedml("runs", str(finished_run.parent))
    assert table.returncode == 0 and "run" in table.stdout and "2/2" in table.stdout

    missing = _fedml("runs", str(finished_run / "commits"))
    assert missing.returncode == 2 and "neither a run directory" in missing.stderr


def test_a_run_whose_commits_were_deleted_is_refused_not_rewritten(tmp_path):
    """It used to cut history.jsonl to nothing and start again from round 1."""
    import shutil

    run = tmp_path / "run"
    result = _fedml(
        "simulate", "--rounds", "3", "--clients", "3", "--local-epochs", "1", "--out", str(run),
        "--no-report",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shutil.rmtree(run / "commits")
    before = (run / "history.jsonl").read_bytes()
    result = _fedml("simulate", "--resume", str(run), "--rounds", "5")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "holds rounds up to 3" in message and "were commits deleted?" in message
    assert "--out NEW_DIR" in message
    assert (run / "history.jsonl").read_bytes() == before


def test_a_run_whose_model_is_not_what_its_name_builds_now_is_a_clear_error(tmp_path, monkeypatch):
    """A run made by an earlier fedml whose `cnn` was another network: resuming it is one
    error naming the problem, and the run directory is left as it was."""
    from torch import nn

    from fedml import models

    run = tmp_path / "run"
    quick = {"rounds": 1, "simulation.clients": 2, "client.local_epochs": 1}
    simulate(load_config(None, {**quick, "model.name": "cnn", "out": str(run)}))
    before = sorted((p.relative_to(run), p.stat().st_size) for p in run.rglob("*") if p.is_file())

    def earlier_cnn(input_shape, num_classes, hidden=0):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

    monkeypatch.setitem(models.BUILTIN, "cnn", earlier_cnn)
    store, cfg = open_resume(run, {"rounds": 2})
    with pytest.raises(FedmlError, match="not the network model 'cnn' builds now"):
        simulate(cfg, resume=store)
    after = sorted((p.relative_to(run), p.stat().st_size) for p in run.rglob("*") if p.is_file())
    assert after == before
