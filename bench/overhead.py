"""Framework overhead: `fedml simulate` (in-process engine) vs a plain PyTorch loop.

Both sides do the same work with the same seeds: every client trains locally with
`clients.trainer.train_local` on its own shard, the server takes the example-weighted
mean, and the global model is evaluated on the server's test set after each round.
The plain loop has no Flower messages, no strategy, no run directory. Federated
evaluation is off on the fedml side (the plain loop has none).

    python -m bench.overhead [--clients 50] [--rounds 5] [--repeats 5] [--device cuda]

Prints the best-of-N wall and CPU time of each side, their ratios (target <= 1.05),
and the largest weight difference between the two final models (they agree exactly).
Then the same work as whole processes, start to exit: `fedml simulate CONFIG` (imports,
run directory, end-of-run report) vs the plain script `python -m bench.plain CONFIG`
(`bench/plain.py`), best of N wall times and their ratio (target <= 1.10).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.plain import plain_pytorch
from fedml.config import RunConfig, load_config
from simulations.engine import simulate


def bench_config(clients: int, rounds: int, out: Path, device: str = "cpu") -> RunConfig:
    return load_config(
        None,
        {
            "data.dataset": "synthetic",
            "model.name": "mlp",
            "rounds": rounds,
            "simulation.clients": clients,
            "strategy.fraction_evaluate": 0.0,
            "client.lr": 0.01,
            "client.momentum": 0.0,
            "client.device": device,
            # the plain loop weighs every client by its examples, uncapped; fedml's cap
            # on outsized example counts (a defence) would change what is computed
            "validation.max_weight_factor": 0.0,
            "out": str(out),
        },
    )


def timed(fn, *args) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def whole_process(cfg: RunConfig, root: Path) -> tuple[float, float]:
    """Wall seconds from start to exit of `fedml simulate CONFIG` (imports, run directory
    and the end-of-run report included) and of the plain script `python -m bench.plain
    CONFIG` (imports, training, saving the model)."""
    config = root / "bench.toml"
    config.write_text(cfg.to_toml())
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    commands = {  # fedml.cli as a module: works where fedml is on PYTHONPATH, not installed
        "fedml": [sys.executable, "-m", "fedml.cli", "simulate", str(config)],
        "plain": [sys.executable, "-m", "bench.plain", str(config), str(root / "plain.st")],
    }
    seconds = {}
    for side, command in commands.items():
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True)
        seconds[side] = time.perf_counter() - started
    return seconds["fedml"], seconds["plain"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (both sides)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # both sides alike; avoids thread-pool noise on 2 cores
    logging.getLogger("flwr").setLevel(logging.ERROR)

    runs: dict[str, list[tuple[float, float]]] = {"fedml": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        # one warm-up of each side (imports, dataset cache), then alternate the sides
        for repeat in range(args.repeats + 1):
            cfg = bench_config(args.clients, args.rounds, Path(tmp) / f"run{repeat}", args.device)
            fedml_wall, fedml_cpu, _ = timed(simulate, cfg)
            plain_wall, plain_cpu, plain_state = timed(plain_pytorch, cfg)
            if repeat:
                runs["fedml"].append((fedml_wall, fedml_cpu))
                runs["plain"].append((plain_wall, plain_cpu))
        from safetensors.numpy import load_file

        ours = load_file(Path(tmp) / f"run{args.repeats}" / "model.safetensors")
    diff = max(float(np.abs(ours[k] - plain_state[k].cpu().numpy()).max()) for k in ours)
    # best of N: the run least disturbed by the rest of the machine
    best = {side: (min(w for w, _ in r), min(c for _, c in r)) for side, r in runs.items()}
    print(
        f"workload: {args.clients} clients x {args.rounds} rounds, mlp, synthetic(1,1), "
        f"best of {args.repeats}, on {args.device}"
    )
    print(f"{'':22}{'wall s':>9}{'cpu s':>9}")
    print(f"{'plain PyTorch loop':22}{best['plain'][0]:9.2f}{best['plain'][1]:9.2f}")
    print(f"{'fedml simulate':22}{best['fedml'][0]:9.2f}{best['fedml'][1]:9.2f}")
    print(
        f"{'ratio (target <= 1.05)':22}{best['fedml'][0] / best['plain'][0]:9.3f}"
        f"{best['fedml'][1] / best['plain'][1]:9.3f}"
    )
    print(f"max |w_fedml - w_plain| = {diff:.3g} (same seeds, same computation)")

    whole: dict[str, list[float]] = {"fedml": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            cfg = bench_config(args.clients, args.rounds, Path(tmp) / f"w{repeat}", args.device)
            fedml_wall, plain_wall = whole_process(cfg, Path(tmp))
            whole["fedml"].append(fedml_wall)
            whole["plain"].append(plain_wall)
    fedml_best, plain_best = min(whole["fedml"]), min(whole["plain"])
    print("whole process, start to exit (imports, and fedml's run directory and report):")
    print(f"{'plain script':22}{plain_best:9.2f}")
    print(f"{'fedml simulate':22}{fedml_best:9.2f}")
    print(f"{'ratio (target <= 1.10)':22}{fedml_best / plain_best:9.3f}")


if __name__ == "__main__":
    main()
