"""Local training and evaluation of a torch model on one client's shard.

Batches are drawn by index from tensors already on the training device (no DataLoader
worker or collate cost for in-memory shards). Data order comes from a `torch.Generator`
seeded by the caller, so local training is reproducible.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fedml.data import Shard
from fedml.errors import FedmlError
from fedml.metrics import binary_metrics
from fedml.settings import TrainSettings


@dataclass(frozen=True)
class TrainResult:
    """Mean training loss (without the proximal term) over all steps, and counts."""

    loss: float
    num_examples: int
    steps: int


def resolve_device(choice: str) -> torch.device:
    """'auto' picks CUDA when present; 'cpu', 'cuda', 'cuda:N' are taken as given."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise FedmlError(
            f"client.device '{choice}' was requested but CUDA is not available on this "
            "machine. Use --device auto or --device cpu."
        )
    device = torch.device(choice)
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise FedmlError(
                f"client.device '{choice}': this machine has {count} CUDA device(s), "
                f"numbered 0..{count - 1}."
            )
    return device


def to_tensors(shard: Shard, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The shard as tensors on `device` (pinned first when copying to CUDA)."""
    x, y = torch.from_numpy(shard.x), torch.from_numpy(shard.y)
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def proximal_term(model: nn.Module, global_params: list[torch.Tensor]) -> torch.Tensor:
    """||w - w_global||^2 over the trainable parameters (the SQUARED L2 norm)."""
    return sum(
        (p - g).pow(2).sum()
        for p, g in zip(model.parameters(), global_params, strict=True)
        if p.requires_grad
    )


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(
        params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )


def train_local(
    model: nn.Module,
    shard: Shard,
    settings: TrainSettings,
    device: torch.device,
    generator: torch.Generator,
    anchor: nn.Module | None = None,
    corrections: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Run `settings.local_epochs` epochs (or `settings.local_steps` steps) of minibatch
    training on `shard`, in place (`minibatches`).

    With `proximal_mu > 0` the objective loss + (mu/2)·||w - w_global||² is minimised:
    `w_global` is `anchor`'s weights (Ditto: the round's global model), else the weights
    the model held when this call started (FedProx). `corrections` (SCAFFOLD's c - c_i,
    by parameter name) is added to every step's gradient.
    """
    model.to(device).train()
    x, y = to_tensors(shard, device)
    optimizer = make_optimizer(model, settings)
    criterion = nn.CrossEntropyLoss()
    mu = settings.proximal_mu
    pulled_to = model if anchor is None else anchor.to(device)
    global_params = [p.detach().clone() for p in pulled_to.parameters()] if mu > 0 else []
    corrected = [
        (p, corrections[name].to(device)) for name, p in model.named_parameters()
        if corrections is not None and name in corrections
    ]  # fmt: skip
    total_loss, steps = 0.0, 0
    for index in minibatches(len(y), settings, generator, device):
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x[index]), y[index])
        objective = loss + (mu / 2) * proximal_term(model, global_params) if mu > 0 else loss
        objective.backward()
        for p, correction in corrected:
            if p.grad is not None:
                p.grad.add_(correction)
        optimizer.step()
        total_loss += loss.item()
        steps += 1
    return TrainResult(loss=total_loss / max(steps, 1), num_examples=len(y), steps=steps)


def minibatches(
    rows: int, settings: TrainSettings, generator: torch.Generator, device: torch.device
) -> Iterator[torch.Tensor]:
    """The row indices of each step: `local_epochs` shuffled passes over the rows, or
    with `local_steps` > 0 exactly that many batches, reshuffling at every pass."""
    batch, done = settings.batch_size, 0
    for _ in itertools.count() if settings.local_steps > 0 else range(settings.local_epochs):
        order = torch.randperm(rows, generator=generator).to(device)
        for start in range(0, rows, batch):
            if 0 < settings.local_steps <= done:
                return
            yield order[start : start + batch]
            done += 1
        if rows == 0:
            return


@torch.no_grad()
def evaluation_metrics(
    model: nn.Module, shard: Shard, device: torch.device, batch_size: int = 1024
) -> dict[str, float]:
    """`loss`, `accuracy` and `num-examples` of `model` on `shard`; for a two-class model
    also the confusion counts, sensitivity, specificity, balanced accuracy, F1 and AUROC
    (`fedml.metrics`), from the scores P(class 1)."""
    model.to(device).eval()
    x, y = to_tensors(shard, device)
    loss_sum, correct, scores = 0.0, 0, []
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(dim=1) == target).sum().item()
        if logits.shape[1] == 2:
            scores.append(torch.softmax(logits.double(), dim=1)[:, 1].cpu())
    n = max(len(y), 1)
    result = {"loss": loss_sum / n, "accuracy": correct / n, "num-examples": len(y)}
    if scores:
        result.update(binary_metrics(torch.cat(scores).numpy(), shard.y))
    return result


@torch.no_grad()
def evaluate(
    model: nn.Module, shard: Shard, device: torch.device, batch_size: int = 1024
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of `model` on `shard` (`evaluation_metrics`'
    first two)."""
    metrics = evaluation_metrics(model, shard, device, batch_size)
    return metrics["loss"], metrics["accuracy"]
