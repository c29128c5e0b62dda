"""Round latency of a deployment: fedml's ServerApp and ClientApp vs a trivial stock
Flower App, on the same loopback setup.

Both sides run a real `flower-superlink` and N `flower-supernode` processes on
127.0.0.1 (no TLS, so that only the apps differ), with telemetry and runtime
installation off, and play the same number of rounds of one train and one evaluate
phase each:

- stock: Flower's own `FedAvg.start` with a ClientApp that echoes the model back (no
  torch, no data, no training): what Flower itself costs per phase;
- fedml: `fedml server --insecure` and `fedml client --insecure`, logistic regression
  on each site's digits shard (1 local epoch: a few milliseconds of compute), with
  validation, centralized evaluation and a commit per round.

    python -m bench.deploy [--sites 2] [--rounds 3]

Prints seconds per round (and per phase: half of it) of each side and their ratio.
Every message to a SuperNode runs in a fresh `flwr-clientapp` process, so most of a
phase is process start and imports, Flower's and (for fedml) PyTorch's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.stock import write_local_connection, write_stock_app
from fedml.config import load_config
from fedml.data import federation_for
from fedml.deploy.launch import CONNECTION, start_superlink
from fedml.deploy.processes import (
    Child,
    flower_command,
    flower_env,
    free_port,
    run_quietly,
)

STOCK_APP = """
import json, time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg

client = ClientApp()


@client.train()
def train(msg, context):
    metrics = MetricRecord({"num-examples": 1})
    return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg)


@client.evaluate()
def evaluate(msg, context):
    metrics = MetricRecord({"num-examples": 1, "loss": 0.0})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


server = ServerApp()


@server.main()
def main(grid, context):
    sites, rounds = int(context.run_config["sites"]), int(context.run_config["rounds"])
    arrays = ArrayRecord([np.zeros((64, 10), np.float32), np.zeros(10, np.float32)])
    strategy = FedAvg(min_train_nodes=sites, min_evaluate_nodes=sites, min_available_nodes=sites)
    start = time.perf_counter()
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds)
    seconds = time.perf_counter() - start
    Path(context.run_config["out"]).write_text(json.dumps({"seconds": seconds}))
"""


def stock_seconds_per_round(work: Path, sites: int, rounds: int) -> float:
    """A trivial stock Flower App on a SuperLink and `sites` SuperNodes."""
    config = {"sites": sites, "rounds": rounds, "out": str(work / "stock.json")}
    app = write_stock_app(work / "stock-app", STOCK_APP, config)
    port, home = free_port(), work / "flwr-home"
    write_local_connection(home, port)
    env = flower_env(home)
    children = []
    try:
        log = work / "stock-superlink.log"
        children.append(start_superlink("127.0.0.1", port, log, env, ["--insecure"]))
        for i in range(sites):
            command = [
                *flower_command("flower-supernode"), "--insecure",
                "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
            ]  # fmt: skip
            children.append(Child("SuperNode", command, work / f"stock-supernode-{i}.log", env))
        run_quietly([*flower_command("flwr"), "run", str(app), CONNECTION, "--stream"], env, 900)
        return json.loads((work / "stock.json").read_text())["seconds"] / rounds
    finally:
        for child in reversed(children):
            child.stop()


def fedml_seconds_per_round(work: Path, sites: int, rounds: int) -> float:
    """`fedml server` and `fedml client` (insecure) on digits shards, logistic regression."""
    federation = federation_for(load_config(None, {"simulation.clients": sites}))
    port, run = free_port(), work / "fedml-run"
    config = work / "run.toml"
    config.write_text(
        f'rounds = {rounds}\n[model]\nname = "logreg"\n[client]\nlocal_epochs = 1\n'
        f"[simulation]\nclients = {sites}\n"
    )
    fedml = [sys.executable, "-m", "fedml.cli"]
    env = flower_env()
    children = []
    try:
        command = [
            *fedml, "server", str(config), "--insecure", "--sites", str(sites),
            "--port", str(port), "--out", str(run), "--no-report",
        ]  # fmt: skip
        server = Child("fedml server", command, work / "fedml-server.log", env)
        children.append(server)
        for i in range(sites):
            shard = federation.client(i)
            np.savez(work / f"site-{i}.npz", x=shard.x, y=shard.y)
            command = [
                *fedml, "client", "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--data", str(work / f"site-{i}.npz"), "--port", str(free_port()),
                "--state-dir", str(work / f"site-{i}"),
            ]  # fmt: skip
            log = work / f"fedml-client-{i}.log"
            children.append(Child("fedml client", command, log, env))
        if server.wait(900) != 0:
            raise SystemExit(f"fedml server failed:\n{server.tail(40)}")
        rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        return sum(row["seconds"] for row in rows) / len(rows)
    finally:
        for child in reversed(children):
            child.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedml-bench-deploy-"))
    try:
        started = time.perf_counter()
        stock = stock_seconds_per_round(work, args.sites, args.rounds)
        ours = fedml_seconds_per_round(work, args.sites, args.rounds)
        print(f"{args.sites} SuperNodes on loopback, {args.rounds} rounds (train + evaluate)")
        for name, seconds in (("stock Flower, echo ClientApp", stock), ("fedml, logreg", ours)):
            print(f"{name:29}: {seconds:6.2f} s per round, {seconds / 2:5.2f} s per phase")
        print(f"ratio fedml / stock          : {ours / stock:6.2f}")
        print(f"(bench wall time {time.perf_counter() - started:.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
