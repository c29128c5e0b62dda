"""FLamby's Fed-Heart-Disease benchmark, reproduced with fedml, beside FLamby's figures.

FLamby (du Terrail et al., NeurIPS 2022 Datasets and Benchmarks) publishes, for its
Fed-Heart-Disease split, the accuracy of a logistic regression trained federated with
six strategies, on each hospital's data alone, and on the pooled data. This script runs
the same protocol through `fedml simulate` and prints both side by side:

- the data: the four hospitals of `fedml.data.heart` (FLamby's preprocessing and split,
  row for row), each hospital's rows standardised with its own training rows' mean and
  (unbiased) standard deviation, as FLamby's `FedHeartDisease` does; the pooled test
  set standardised with the pooled training rows' statistics (FLamby's
  `pooled=True`), and the models are scored on both, as FLamby scores them;
- the model: FLamby's `Baseline`, one linear unit and a sigmoid with binary
  cross-entropy (`flamby_logreg` below: logits [0, z], whose softmax cross-entropy is
  exactly that loss);
- federated: 15 rounds, every hospital every round, 100 local SGD steps of batch 4
  (`--local-steps 100 --batch-size 4`), all training rows (no validation split), FLamby's
  learning rates and server settings (its `config_heart_disease.json`): FedAvg (0.001),
  FedProx (0.001, mu 0.01), FedAdam (0.01; server 0.01, betas 0.9/0.999, tau 1e-8),
  FedYogi (0.003162; server 0.01), FedAdagrad (0.003162; server 0.316228), SCAFFOLD
  (0.001; server 1); and FedAdam once more with the server step FLamby's FedAdam takes
  (it does not correct Adam's bias, Flower's does);
- local and pooled: Adam at 0.001, batch 4, 50 epochs, on one hospital's rows or on all.

Every row is the mean ± standard deviation over seeds 0-4 of (the mean of the four
hospitals' test accuracies, the pooled test accuracy); FLamby's are over its seeds
42-46, computed from its repository's results files
(`flamby/results/results_benchmark_fed_heart_disease/heart_seed4[2-6].csv`). Last, fedml's
own way on the same split: the preset `fed-heart-disease` (raw rows, one federated
standardisation shared by every hospital).

    python -m bench.flamby [--seeds 5]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clients.trainer import evaluate, train_local
from fedml.arrays import to_state_dict
from fedml.config import load_config
from fedml.data import Shard
from fedml.data.heart import read_hospitals
from fedml.runstore import read_model
from fedml.settings import TrainSettings
from simulations.engine import simulate

# FLamby's results files, seeds 42-46: (hospitals' mean, its std; pooled test, its std).
FLAMBY = {
    "FedAvg": (0.685, 0.025, 0.748, 0.024),
    "FedProx": (0.685, 0.025, 0.748, 0.024),
    "FedAdam": (0.726, 0.012, 0.779, 0.013),
    "FedYogi": (0.731, 0.011, 0.779, 0.014),
    "FedAdagrad": (0.731, 0.011, 0.779, 0.014),
    "SCAFFOLD": (0.684, 0.025, 0.748, 0.024),
    "Local 0 (cleveland)": (0.722, 0.019, 0.784, 0.006),
    "Local 1 (hungary)": (0.629, 0.015, 0.727, 0.012),
    "Local 2 (switzerland)": (0.567, 0.052, 0.483, 0.040),
    "Local 3 (va-long-beach)": (0.637, 0.034, 0.611, 0.035),
    "Pooled training": (0.735, 0.002, 0.795, 0.002),
}
ADAPTIVE = {"beta_1": 0.9, "beta_2": 0.999, "tau": 1e-8}
# FLamby's config_heart_disease.json: each strategy's client learning rate and options.
STRATEGIES = {
    "FedAvg": {"strategy.name": "fedavg", "client.lr": 0.001},
    "FedProx": {"strategy.name": "fedprox", "client.lr": 0.001, "strategy.proximal_mu": 0.01},
    "FedAdam": {
        "strategy.name": "fedadam",
        "client.lr": 0.01,
        **{f"strategy.{k}": v for k, v in {"eta": 0.01, **ADAPTIVE}.items()},
    },
    "FedYogi": {
        "strategy.name": "fedyogi",
        "client.lr": 0.003162,
        **{f"strategy.{k}": v for k, v in {"eta": 0.01, **ADAPTIVE}.items()},
    },
    "FedAdagrad": {
        "strategy.name": "fedadagrad",
        "client.lr": 0.003162,
        "strategy.eta": 0.316228,
        "strategy.tau": 1e-8,
    },
    "SCAFFOLD": {"strategy.name": "scaffold", "client.lr": 0.001, "server.lr": 1.0},
}
# Flower's FedAdam corrects Adam's bias: its server step is eta x sqrt(1 - beta_2^(t+1)) /
# (1 - beta_1^(t+1)) x m / sqrt(v), 0.24 to 0.16 of FLamby's uncorrected step over these
# 15 rounds (beta_2 = 0.999). The same run with eta x sqrt(10) = 0.0316 steps closer to
# FLamby's size (0.74 to 0.49 of it).
STRATEGIES["FedAdam, eta 0.0316"] = {**STRATEGIES["FedAdam"], "strategy.eta": 0.0316}
COMPARED = {"FedAdam, eta 0.0316": "FedAdam"}  # the FLamby row a variant is read against
PROTOCOL = {
    "model.name": "bench.flamby:flamby_logreg",
    "rounds": 15,
    "simulation.clients": 4,
    "strategy.fraction_train": 1.0,
    "strategy.min_train_clients": 4,
    "strategy.fraction_evaluate": 0.0,  # no validation rows: FLamby trains on all of them
    "data.val_fraction": 0.0,
    "data.preprocess": "none",  # the rows are standardised per hospital already
    "client.local_steps": 100,
    "client.batch_size": 4,
    "client.momentum": 0.0,
}
CENTRAL = TrainSettings(local_epochs=50, batch_size=4, lr=0.001, optimizer="adam", momentum=0.0)
CPU = torch.device("cpu")


class _SigmoidUnit(nn.Module):
    """FLamby's Baseline as two-class logits: [0, w·x + b]. Softmax cross-entropy on
    them is binary cross-entropy on sigmoid(w·x + b), and the argmax is its 0.5 cut."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x.flatten(1))
        return torch.cat([torch.zeros_like(z), z], dim=1)


def flamby_logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model factory `fedml simulate --model bench.flamby:flamby_logreg` builds."""
    if num_classes != 2:
        raise ValueError("FLamby's Baseline is a binary classifier")
    return _SigmoidUnit(int(np.prod(input_shape)))


@dataclass(frozen=True)
class FlambyData:
    """Each hospital's training and test rows standardised with its own training
    statistics, and the pooled test standardised with the pooled training's."""

    train: tuple[Shard, ...]
    test: tuple[Shard, ...]
    pooled_train: Shard
    pooled_test: Shard


def flamby_data() -> FlambyData:
    hospitals = read_hospitals()

    def standardised(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
        mean, std = reference.mean(axis=0), reference.std(axis=0, ddof=1)
        return ((x - mean) / (std + 1e-9)).astype(np.float32)

    train = tuple(Shard(standardised(h.train.x, h.train.x), h.train.y) for h in hospitals)
    test = tuple(Shard(standardised(h.test.x, h.train.x), h.test.y) for h in hospitals)
    all_train = np.concatenate([h.train.x for h in hospitals])
    pooled_train = Shard(
        standardised(all_train, all_train), np.concatenate([h.train.y for h in hospitals])
    )
    pooled_test = Shard(
        standardised(np.concatenate([h.test.x for h in hospitals]), all_train),
        np.concatenate([h.test.y for h in hospitals]),
    )
    return FlambyData(train, test, pooled_train, pooled_test)


def scores(model: nn.Module, data: FlambyData) -> tuple[float, float]:
    """(mean of the hospitals' test accuracies, pooled test accuracy), FLamby's way."""
    hospitals = [evaluate(model, shard, CPU)[1] for shard in data.test]
    return float(np.mean(hospitals)), evaluate(model, data.pooled_test, CPU)[1]


def federated(name: str, seed: int, data: FlambyData, folder: Path) -> tuple[float, float]:
    """One fedml run of FLamby's protocol with strategy `name`, scored FLamby's way."""
    shards = folder / f"shards-{seed}"
    if not shards.exists():
        shards.mkdir()
        for i, shard in enumerate(data.train):
            np.savez(shards / f"client-{i}.npz", x=shard.x, y=shard.y)
        np.savez(shards / "test.npz", x=data.pooled_test.x, y=data.pooled_test.y)
    out = folder / f"{name}-{seed}"
    overrides = {**PROTOCOL, **STRATEGIES[name], "data.dataset": f"npz:{shards}"}
    cfg = load_config(None, {**overrides, "seed": seed, "out": str(out)})
    simulate(cfg)
    model = flamby_logreg((13,), 2)
    model.load_state_dict(to_state_dict(read_model(out / "model.safetensors")))
    return scores(model, data)


def central(shard: Shard, seed: int, data: FlambyData) -> tuple[float, float]:
    """FLamby's local and pooled baselines: Adam at 0.001, batch 4, 50 epochs."""
    torch.manual_seed(seed)
    model = flamby_logreg((13,), 2)
    train_local(model, shard, CENTRAL, CPU, torch.Generator().manual_seed(seed))
    return scores(model, data)


def preset(seed: int, folder: Path) -> tuple[float, float]:
    """fedml's recommended setting on the same split (raw rows, shared standardisation)."""
    from bench.heart import federated as heart_run
    from simulations.presets import resolve_config

    return heart_run(seed, folder / f"preset-{seed}", resolve_config(Path("fed-heart-disease")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    seeds = range(args.seeds)
    data = flamby_data()
    names = [h.name for h in read_hospitals()]
    print(f"{'method':26s} {'fedml: hospitals':>17s} {'pooled test':>15s}   "
          f"{'FLamby: hospitals':>17s} {'pooled test':>15s}")  # fmt: skip

    def show(label: str, results: list[tuple[float, float]], flamby: str | None) -> None:
        hospitals, pooled = np.array(results).T
        line = (
            f"{label:26s} {hospitals.mean():9.3f} ± {hospitals.std():.3f} "
            f"{pooled.mean():7.3f} ± {pooled.std():.3f}"
        )
        if flamby is not None:
            h, h_std, p, p_std = FLAMBY[flamby]
            line += f"   {h:9.3f} ± {h_std:.3f} {p:7.3f} ± {p_std:.3f}"
        print(line, flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for name in STRATEGIES:
            show(name, [federated(name, s, data, folder) for s in seeds], COMPARED.get(name, name))
        for i, shard in enumerate(data.train):
            label = f"Local {i} ({names[i]})"
            show(label, [central(shard, s, data) for s in seeds], label)
        show("Pooled training", [central(data.pooled_train, s, data) for s in seeds],
             "Pooled training")  # fmt: skip
        show("fedml preset (raw rows)", [preset(s, folder) for s in seeds], None)


if __name__ == "__main__":
    main()
