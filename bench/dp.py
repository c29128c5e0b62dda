"""Differential privacy: what DP-SGD costs in time, and what epsilon costs in accuracy.

1. Slowdown: one client's local training on its digits shard, plain
   (`clients.trainer.train_local`) vs DP-SGD (`clients.privacy.train_private`: Opacus
   per-example gradients, clipping, noise, Poisson batches), same model, data, epochs
   and batch size; best of N wall times and their ratio.
2. Trade-off: whole `fedml simulate` runs on digits with a target epsilon of 1, 3 and 8
   (the noise derived up front for the planned rounds) and without DP; final test
   accuracy and the largest client epsilon.

    python -m bench.dp [--repeats 5] [--rounds 15] [--clients 4]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from clients.app import LocalJob
from clients.privacy import PrivacyLedger, plan_round, train_private
from clients.trainer import train_local
from fedml.config import RunConfig, load_config
from fedml.models import model_for
from fedml.settings import TrainSettings
from simulations.engine import simulate

EPSILONS = (1.0, 3.0, 8.0)


def bench_config(clients: int, rounds: int, out: Path, **dp) -> RunConfig:
    return load_config(
        None, {"rounds": rounds, "simulation.clients": clients, "out": str(out), **dp}
    )


def _best_time(train, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        train()
        best = min(best, time.perf_counter() - started)
    return best


def slowdown(cfg: RunConfig, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` seconds of plain and of DP-SGD local training (client 0)."""
    job = LocalJob.load(cfg, 0)
    c = cfg.client
    settings = TrainSettings.for_round(c, c.lr)
    device = torch.device("cpu")
    dp_cfg = load_config(None, {"dp.mode": "sample"}).dp
    plan = plan_round(dp_cfg, PrivacyLedger(), len(job.train), settings, planned_rounds=1)

    def model():
        return model_for(cfg, job.input_shape, job.num_classes)

    plain = _best_time(
        lambda: train_local(model(), job.train, settings, device, torch.Generator().manual_seed(0)),
        repeats,
    )
    private = _best_time(
        lambda: train_private(model(), job.train, settings, device, plan, 1.0, seed=0), repeats
    )
    return plain, private


def trade_off(clients: int, rounds: int, root: Path) -> list[tuple[str, float, float | None]]:
    """(label, final test accuracy, largest client epsilon) per setting."""
    rows = []
    for epsilon in (*EPSILONS, None):
        dp = {} if epsilon is None else {"dp.mode": "sample", "dp.target_epsilon": epsilon}
        label = "no DP" if epsilon is None else f"target {epsilon:g}"
        summary = simulate(bench_config(clients, rounds, root / label.replace(" ", "-"), **dp))
        privacy = summary.final.get("privacy")
        spent = privacy["epsilon_max"] if privacy else None
        rows.append((label, summary.final["server"]["accuracy"], spent))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = bench_config(args.clients, args.rounds, root / "probe")
        plain, private = slowdown(cfg, args.repeats)
        n = len(LocalJob.load(cfg, 0).train)
        print(f"local training, client 0 ({n} examples, mlp, {cfg.client.local_epochs} epochs)")
        print(f"  plain   {plain * 1000:8.1f} ms")
        print(f"  DP-SGD  {private * 1000:8.1f} ms")
        print(f"  DP-SGD / plain = {private / plain:.2f}")
        print()
        print(f"digits, {args.clients} clients, {args.rounds} rounds: epsilon vs accuracy")
        print(f"  {'setting':<12} {'test accuracy':>14} {'epsilon (max)':>14}")
        for label, accuracy, spent in trade_off(args.clients, args.rounds, root):
            shown = "-" if spent is None else f"{spent:.2f}"
            print(f"  {label:<12} {accuracy:>14.4f} {shown:>14}")


if __name__ == "__main__":
    main()
