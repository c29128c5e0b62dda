"""Flower interoperability both ways: a stock Flower ClientApp under our strategies, and
our ClientApp under Flower's stock FedAvg and its own `Strategy.start` loop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from torch import nn

from clients.app import app as fedml_client_app
from fedml.config import load_config
from fedml.data import load_federation
from fedml.deploy.processes import flower_command, flower_env, free_port
from fedml.models import build_model
from fedml.runstore import RunStore
from fedml.server import Experiment, run_experiment
from fedml.server import app as fedml_server_app
from simulations.inprocess import InProcessGrid

# ---- a ClientApp written the way Flower's documentation shows ------------------------
stock_app = ClientApp()


class Net(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _load_data(partition_id: int):
    shard = load_federation("digits", "auto", 4, 0.2, 0).client(partition_id)
    return torch.from_numpy(shard.x), torch.from_numpy(shard.y)


@stock_app.train()
def stock_train(msg: Message, context: Context):
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = _load_data(context.node_config["partition-id"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        for i in range(0, len(y), 32):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
            loss.backward()
            optimizer.step()
    model_record = ArrayRecord(model.state_dict())
    metrics = MetricRecord({"train_loss": loss.item(), "num-examples": len(y)})
    content = RecordDict({"arrays": model_record, "metrics": metrics})
    return Message(content=content, reply_to=msg)


@stock_app.evaluate()
def stock_evaluate(msg: Message, context: Context):
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = _load_data(context.node_config["partition-id"])
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    metrics = MetricRecord({"eval_acc": accuracy, "num-examples": len(y)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_stock_flower_client_trains_under_our_strategies(tmp_path, strategy):
    cfg = load_config(None, {"rounds": 3, "simulation.clients": 4, "strategy.name": strategy})
    grid = InProcessGrid(stock_app, 4, cfg.to_flat())
    summary = run_experiment(grid, Experiment.prepare(cfg), RunStore.create(tmp_path / "run", cfg))
    first, last = summary.history[0], summary.history[-1]
    assert last["clients"]["aggregated"] == 4
    assert last["evaluate"]["eval_acc"] > first["evaluate"]["eval_acc"]
    assert last["server"]["accuracy"] > 0.6


def test_our_client_trains_under_flowers_stock_fedavg_and_loop():
    cfg = load_config(None, {"simulation.clients": 4})
    grid = InProcessGrid(fedml_client_app, 4, cfg.to_flat())
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    result = FlowerFedAvg(min_available_nodes=4).start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=3,
        train_config=ConfigRecord({"lr": 0.1}),
    )
    accuracies = [m["accuracy"] for _, m in sorted(result.evaluate_metrics_clientapp.items())]
    assert len(accuracies) == 3
    assert accuracies[-1] > 0.6 and accuracies[-1] > accuracies[0]


def test_server_app_runs_the_same_loop_as_simulate(tmp_path):
    """What `flwr run` calls: the ServerApp with the flat run config in its Context."""
    cfg = load_config(None, {"rounds": 2, "simulation.clients": 4, "out": str(tmp_path / "r")})
    grid = InProcessGrid(fedml_client_app, 4, cfg.to_flat())
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_flat()
    )
    fedml_server_app(grid, context)
    assert len(RunStore.open(tmp_path / "r").history()) == 2


REPOSITORY = Path(__file__).resolve().parent.parent


def _kill_managed_superlink(flower_home: Path, port: int) -> None:
    """`flwr run` leaves its managed SuperLink running, detached in its own process
    group, and the SuperLink's executor and simulation in others: kill every Flower
    process that names this test's Flower home or SuperLink port, everything they
    started (Ray's processes too), with their groups, and wait until all are gone."""
    from fedml.deploy.processes import _process_table, descendants, sweep_group

    marks = (str(flower_home).encode(), f"127.0.0.1:{port}".encode())
    table = _process_table()
    roots = set()
    for pid in table:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"flower-" in a or b"flwr-" in a for a in argv) and any(
            mark in a for mark in marks for a in argv
        ):
            roots.add(pid)
    doomed = roots | {child for root in roots for child in descendants(root, table)}
    groups = {table[pid][1] for pid in doomed} - {os.getpgrp()}
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for group in groups:
        sweep_group(group)


@pytest.mark.xdist_group("ray")  # Flower's local simulation starts Ray
def test_flwr_run_on_flowers_managed_local_simulation(tmp_path):
    """What a Flower user types first: `flwr run .` with a fresh Flower home and runtime
    dependency installation off. Flower starts its managed local SuperLink with its
    default 2 simulated SuperNodes; the run directory holds the committed rounds, and
    each node trained half of the data (num-partitions 2), not a tenth of it."""
    home, run = tmp_path / "flower-home", tmp_path / "run"
    port = free_port()
    env = {
        **flower_env(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    overrides = f'rounds=2 "client.local_epochs"=1 out="{run}"'
    command = [*flower_command("flwr"), "run", ".", "--run-config", overrides, "--stream"]
    try:
        done = subprocess.run(
            command, cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        _kill_managed_superlink(home, port)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = RunStore.open(run).history()
    assert [row["round"] for row in rows] == [1, 2]
    assert [row["clients"]["aggregated"] for row in rows] == [2, 2]
    digits_training_pool = 1797 * 0.8 * 0.8  # test and validation fractions held out
    assert rows[-1]["train"]["num-examples"] == pytest.approx(digits_training_pool, rel=0.02)
    assert rows[-1]["server"]["accuracy"] > 0.6
    # `fedml runs` describes the federation by the nodes that trained, not the config's 10
    out = subprocess.run(
        [sys.executable, "-m", "fedml.cli", "runs", str(run)], capture_output=True, text=True
    )
    assert "up to 2 Flower nodes a round" in out.stdout and "10 clients" not in out.stdout
