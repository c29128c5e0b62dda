"""Engines on one workload: fedml's Ray engine and in-process engine vs stock Flower's
Simulation Runtime (Ray) running the same model on the same data.

Workload (the issue's): 10 clients x 5 rounds of a 60-64-10 MLP on Synthetic(1, 1),
1 local epoch, batch 32, SGD lr 0.05, every client sampled, no federated evaluation.

- stock: a plain Flower App (`FedAvg.start`, a ClientApp with a textbook PyTorch loop),
  submitted with `flwr run` to `flower-superlink --simulation`;
- fedml ray: `fedml simulate --engine ray` on the same kind of SuperLink; it also
  screens every update, evaluates on the server's test set and commits each round;
- fedml in-process: `fedml simulate` (the default engine), the same run in one process.

Each side's wall time runs from starting its SuperLink (or its run) to the end, so it
includes starting Ray and its actors. Also printed: the seconds the rounds themselves
took (stock: `FedAvg.start`; fedml: the history's per-round seconds).

    python -m bench.ray [--clients 10] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.stock import write_local_connection, write_stock_app
from fedml.config import RunConfig, load_config
from fedml.deploy.launch import CONNECTION, start_superlink
from fedml.deploy.processes import flower_command, flower_env, free_port, run_quietly

LR, BATCH, EPOCHS = 0.05, 32, 1

STOCK_APP = """
import json, time
from pathlib import Path

import torch
from torch import nn
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg

from fedml.data import load_federation  # the same Synthetic(1, 1) shards, nothing else


def net():
    return nn.Sequential(nn.Flatten(), nn.Linear(60, 64), nn.ReLU(), nn.Linear(64, 10))


client = ClientApp()


@client.train()
def train(msg, context):
    clients = int(context.node_config["num-partitions"])
    shard = load_federation("synthetic", "auto", clients, 0.2, 0).client(
        int(context.node_config["partition-id"])
    )
    x, y = torch.from_numpy(shard.x), torch.from_numpy(shard.y)
    model = net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(EPOCHS):
        order = torch.randperm(len(y))
        for start in range(0, len(y), BATCH):
            index = order[start : start + BATCH]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
    metrics = MetricRecord({"num-examples": len(y)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


server = ServerApp()


@server.main()
def main(grid, context):
    started = time.perf_counter()
    FedAvg(fraction_evaluate=0.0).start(
        grid=grid, initial_arrays=ArrayRecord(net().state_dict()),
        num_rounds=int(context.run_config["rounds"]),
    )
    seconds = time.perf_counter() - started
    Path(context.run_config["out"]).write_text(json.dumps({"seconds": seconds}))
"""


@dataclass(frozen=True)
class Timing:
    wall: float  # start of the SuperLink (or run) to the end
    rounds: float  # the rounds alone


def bench_config(clients: int, rounds: int, out: Path, engine: str) -> RunConfig:
    return load_config(
        None,
        {
            "data.dataset": "synthetic",
            "model.name": "mlp",
            "model.hidden": 64,
            "rounds": rounds,
            "simulation.clients": clients,
            "simulation.engine": engine,
            "strategy.fraction_train": 1.0,
            "strategy.fraction_evaluate": 0.0,
            "client.local_epochs": EPOCHS,
            "client.batch_size": BATCH,
            "client.lr": LR,
            "out": str(out),
        },
    )


def stock(work: Path, clients: int, rounds: int) -> Timing:
    """The stock Flower App on `flower-superlink --simulation`."""
    settings = f"LR, BATCH, EPOCHS = {LR!r}, {BATCH}, {EPOCHS}\n"
    config = {"rounds": rounds, "out": str(work / "stock.json")}
    app = write_stock_app(work / "stock-app", settings + STOCK_APP, config)
    port, home = free_port(), work / "flwr-home"
    write_local_connection(home, port)
    env = flower_env(home)
    started = time.perf_counter()
    superlink = start_superlink(
        "127.0.0.1", port, work / "stock-superlink.log", env, ["--simulation", "--insecure"]
    )
    try:
        federation = f"num-supernodes={clients} client-resources-num-cpus=1"
        run_quietly(
            [*flower_command("flwr"), "run", str(app), CONNECTION, "--stream",
             "--federation-config", federation],
            env,
            900,
        )  # fmt: skip
        wall = time.perf_counter() - started
    finally:
        superlink.stop()
    return Timing(wall, json.loads((work / "stock.json").read_text())["seconds"])


def fedml(work: Path, clients: int, rounds: int, engine: str) -> Timing:
    """`fedml simulate` on `engine` (ray or inprocess)."""
    from simulations.engine import simulate

    started = time.perf_counter()
    summary = simulate(bench_config(clients, rounds, work / f"fedml-{engine}", engine))
    wall = time.perf_counter() - started
    return Timing(wall, sum(row["seconds"] for row in summary.history))


def measure(clients: int, rounds: int) -> dict[str, Timing]:
    """All three sides, in one temporary folder."""
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        work = Path(tmp)
        return {
            "stock Flower, Ray": stock(work, clients, rounds),
            "fedml, Ray engine": fedml(work, clients, rounds, "ray"),
            "fedml, in-process": fedml(work, clients, rounds, "inprocess"),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    results = measure(args.clients, args.rounds)
    baseline = results["stock Flower, Ray"]
    print(f"{args.clients} clients x {args.rounds} rounds, 60-64-10 MLP, Synthetic(1, 1)")
    print(f"{'':22}{'wall s':>8}{'rounds s':>10}{'wall / stock':>14}")
    for name, timing in results.items():
        ratio = timing.wall / baseline.wall
        print(f"{name:22}{timing.wall:8.1f}{timing.rounds:10.1f}{ratio:14.2f}")


if __name__ == "__main__":
    main()
