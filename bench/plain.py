"""The plain baseline of `bench.overhead`: the same federated training as a bare PyTorch
script, with no Flower, no strategy, no run directory and no report.

Every client trains on its own shard (SGD, cross-entropy, one shuffled pass per epoch
drawn from the seeded generator fedml's clients use), the server takes the
example-weighted mean in float64 and evaluates it on the test set after each round.
It reads the data and builds the model with fedml's own data and model functions, so
the two sides compute the same thing: `bench.overhead` prints how far the final weights
differ (0: bit for bit). It imports neither Flower nor fedml's client and server.

    python -m bench.plain CONFIG.toml MODEL_OUT.safetensors    # the whole-process side
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedml.config import RunConfig, load_config
from fedml.data import Shard, federation_for, split_validation
from fedml.models import model_for


def seed_of(*parts: int) -> int:
    """The seed fedml derives for (run seed, round, client): NumPy's SeedSequence."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def device_of(cfg: RunConfig) -> torch.device:
    choice = cfg.client.device
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def train(model: nn.Module, shard: Shard, cfg: RunConfig, generator: torch.Generator) -> None:
    c, device = cfg.client, device_of(cfg)
    x, y = torch.from_numpy(shard.x).to(device), torch.from_numpy(shard.y).to(device)
    model.to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay
    )
    criterion = nn.CrossEntropyLoss()
    model.train()
    for _ in range(c.local_epochs):
        order = torch.randperm(len(y), generator=generator).to(device)
        for start in range(0, len(y), c.batch_size):
            index = order[start : start + c.batch_size]
            optimizer.zero_grad(set_to_none=True)
            criterion(model(x[index]), y[index]).backward()
            optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, shard: Shard) -> float:
    device = next(model.parameters()).device
    model.eval()
    x, y = torch.from_numpy(shard.x).to(device), torch.from_numpy(shard.y).to(device)
    correct = sum(
        int((model(x[s : s + 1024]).argmax(dim=1) == y[s : s + 1024]).sum())
        for s in range(0, len(y), 1024)
    )
    return correct / max(len(y), 1)


def plain_pytorch(cfg: RunConfig, verbose: bool = False) -> dict[str, torch.Tensor]:
    """The run's federated computation as a bare loop over clients, on the run's device;
    `verbose` prints each round's test accuracy, as a script would."""
    fed = federation_for(cfg)
    shards = [
        split_validation(fed.client(i), cfg.data.val_fraction, seed=seed_of(cfg.seed, i))[0]
        for i in range(fed.num_clients)
    ]
    global_model = model_for(cfg, fed.input_shape, fed.num_classes).to(device_of(cfg))
    for server_round in range(1, cfg.rounds + 1):
        state = global_model.state_dict()
        sums = {k: torch.zeros_like(v, dtype=torch.float64, device="cpu") for k, v in state.items()}
        total = 0
        for i, shard in enumerate(shards):
            model = model_for(cfg, fed.input_shape, fed.num_classes)
            model.load_state_dict(state)
            train(
                model, shard, cfg, torch.Generator().manual_seed(seed_of(cfg.seed, server_round, i))
            )
            for k, v in model.state_dict().items():
                sums[k] += v.double().cpu() * len(shard)
            total += len(shard)
        global_model.load_state_dict({k: (v / total).float() for k, v in sums.items()})
        tested = accuracy(global_model, fed.test)
        if verbose:
            print(f"round {server_round}: test accuracy {tested:.4f}")
    return {k: v.cpu() for k, v in global_model.state_dict().items()}


if __name__ == "__main__":
    from safetensors.torch import save_file

    config, out = sys.argv[1:3]
    save_file(plain_pytorch(load_config(Path(config)), verbose=True), out)
