"""Example-level differential privacy at a client: Opacus DP-SGD and a privacy ledger.

With `dp.mode = "sample"` every client trains with DP-SGD (Opacus `PrivacyEngine`:
per-example gradient clipping to `dp.max_grad_norm`, Gaussian noise, Poisson sampling of
each batch) and keeps a `PrivacyLedger`: the Opacus accountant's history of (noise
multiplier, sample rate, steps) over every round the client trained in. The ledger is
what makes epsilon honest across rounds: Flower's Opacus example starts a fresh
`PrivacyEngine` each round, so its epsilon never accumulates.

Where the ledger lives:

- in the node's Flower `Context.state` (record "privacy-ledger"); in simulation the run
  store commits that state, so a resumed run continues the ledger;
- at a deployed data site, also in the site's ledger file named by the node config key
  "privacy-ledger" (`fedml.privacy_ledger.SiteLedger`: one ledger per experiment,
  written atomically after every round). It outlives SuperNode restarts, and a resumed
  run continues its experiment's ledger; the site's lifetime spending over every
  experiment is what its policy may cap (fedml.site_policy, judged before the task).

Before training, the client projects the epsilon it would reach after the round; above
the run's budget (`dp.max_epsilon`, else `dp.target_epsilon`) it declines with a
`PrivacyBudgetExhausted` error instead of training.

Opacus is imported only inside the functions here, and this module only when DP is on
(importing Opacus costs about 5 s).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import Context
from torch import nn

from clients.trainer import TrainResult, make_optimizer, to_tensors
from fedml.config import RunConfig, experiment_digest
from fedml.privacy import HistoryEntry, budget, epsilon_of
from fedml.privacy_ledger import PrivacyLedger, RoundPlan, SiteLedger
from fedml.settings import TrainSettings

if TYPE_CHECKING:
    from fedml.config import DPConfig
    from fedml.data import Shard

LEDGER_RECORD = "privacy-ledger"  # Context.state record, and the node config key of the file


class PrivacyBudgetExhausted(Exception):
    """Training this round would take the client's epsilon past its budget."""


def check_budget(dp: DPConfig, plan: RoundPlan, server_round: int) -> None:
    """Raise `PrivacyBudgetExhausted` when the planned round would exceed the budget."""
    limit = budget(dp)
    if plan.epsilon_after > limit:
        raise PrivacyBudgetExhausted(
            f"privacy budget: round {server_round} would raise this client's epsilon from "
            f"{epsilon_of(plan.history_before, dp.accountant, plan.delta):.4g} to "
            f"{plan.epsilon_after:.4g} (delta "
            f"{plan.delta:g}), above its budget {limit:g}; the client declines to train"
        )


# ------------------------------------------------------------------- ledger storage
def load_ledger(context: Context, cfg: RunConfig) -> PrivacyLedger:
    """The node's ledger for this experiment: from the site's file when the node config
    names one (it survives restarts), else the Context state, else a fresh ledger."""
    path = ledger_path(context)
    if path is not None and path.exists():
        return SiteLedger.load(path).run(experiment_digest(cfg))
    if LEDGER_RECORD in context.state.config_records:
        return PrivacyLedger.from_record(context.state.config_records[LEDGER_RECORD])
    return PrivacyLedger()


def save_ledger(context: Context, cfg: RunConfig, ledger: PrivacyLedger) -> None:
    """Keep the ledger in the Context state and, at a site, as this experiment's entry of
    its file (atomically; the site's task holds the file's lock, `privacy_ledger.locked`)."""
    context.state[LEDGER_RECORD] = ledger.to_record()
    path = ledger_path(context)
    if path is not None:
        site = SiteLedger.load(path)
        site.runs[experiment_digest(cfg)] = ledger
        site.save(path)


def ledger_path(context: Context) -> Path | None:
    value = context.node_config.get(LEDGER_RECORD)
    return Path(str(value)).expanduser() if value else None


# ---------------------------------------------------------------------------- models
# -------------------------------------------------------------------------- training
def noise_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """Where DP noise and Poisson sampling draw from: seeded in simulation (reproducible
    runs), from OS entropy at a deployed site (the seed is in the run config, which the
    server knows, and noise it can regenerate protects nothing)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def train_private(
    model: nn.Module,
    shard: Shard,
    settings: TrainSettings,
    device: torch.device,
    plan: RoundPlan,
    max_grad_norm: float,
    seed: int | None,
    grad_sample_mode: str = "auto",
) -> tuple[TrainResult, list[HistoryEntry]]:
    """DP-SGD on `shard` in place of `train_local`: `settings.local_epochs` passes of Poisson-
    sampled batches with per-example clipping and noise, by Opacus. Returns the result
    and the accountant history after the round (it starts from `plan`'s history).
    `grad_sample_mode` is Opacus's per-example gradient engine (`resolve_grad_sample_mode`).

    FedProx: a proximal term in the loss would be discarded (the DP optimiser replaces
    the gradients), so the step w -= lr * mu * (w - w_global) follows each DP step; it
    depends only on the public global model (post-processing, no privacy cost).
    """
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    model.to(device).train()
    x, y = to_tensors(shard, device)
    sampling = noise_generator(torch.device("cpu"), None if seed is None else seed + 1)
    loader = DataLoader(
        _GatheredTensors(x, y),
        batch_size=settings.batch_size,
        generator=sampling,
        collate_fn=_as_batch,
    )
    with warnings.catch_warnings():
        # Documented choices, not news for every round: the noise RNG (noise_generator),
        # and the backward hook Opacus puts on a first layer whose input needs no grad.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        engine = PrivacyEngine(accountant="rdp")  # its accountant only records the steps
        engine.accountant.history = list(plan.history_before)
        mode = resolve_grad_sample_mode(grad_sample_mode, model)
        private = engine.make_private(
            module=model,
            optimizer=make_optimizer(model, settings),
            criterion=nn.CrossEntropyLoss(),
            data_loader=loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise_generator(device, seed),
            grad_sample_mode=mode,
        )
        if "ghost" in mode:  # ghost clipping's loss runs the two backward passes itself
            dp_model, optimizer, criterion, loader = private
        else:
            (dp_model, optimizer, loader), criterion = private, nn.CrossEntropyLoss()
        loss, steps = _dp_epochs(dp_model, optimizer, criterion, loader, model, settings)
        dp_model.cleanup()
    return TrainResult(loss, len(y), steps), [tuple(e) for e in engine.accountant.history]


class _GatheredTensors(torch.utils.data.TensorDataset):
    """A TensorDataset whose batches are gathered by one indexing operation per tensor
    (`__getitems__`), not one item at a time and stacked: the shard is already a tensor
    on the device."""

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long, device=self.tensors[0].device)
        return [tensor[index] for tensor in self.tensors]


def _as_batch(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gathered batch is already collated."""
    return batch


def resolve_grad_sample_mode(choice: str, model: nn.Module) -> str:
    """The Opacus engine for `model`: `choice` itself unless "auto". Auto is ghost
    clipping for models with a convolution and hooks otherwise, as measured by
    `python -m bench.dp` (the FedAvg CNN on 28x28 images: 8.0x plain training with hooks,
    2.4x with ghost clipping; ResNet-18: 3.6x vs 3.3x; LeNet: within 10% either way;
    MLP: 3.7x vs 4.2x). Opacus's ghost clipping skips per-example gradients only for
    Linear and Embedding layers, so the CNN's gain comes from its wide fc layer (1.6M of
    its 1.66M weights); the convolution is the rule's proxy for the built-in models, not
    the reason. Ghost clipping's second backward pass costs more than it saves on the
    small linear models."""
    if choice != "auto":
        return choice
    has_conv = any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in model.modules())
    return "ghost" if has_conv else "hooks"


def _dp_epochs(
    dp_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    model: nn.Module,
    settings: TrainSettings,
) -> tuple[float, int]:
    """The DP-SGD loop; returns the mean loss over non-empty batches and the steps."""
    mu, lr = settings.proximal_mu, settings.lr
    global_params = [p.detach().clone() for p in model.parameters()] if mu > 0 else []
    total_loss, batches_with_data, steps = 0.0, 0, 0
    for _ in range(settings.local_epochs):
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(dp_model(xb), yb)
            loss.backward()
            optimizer.step()
            steps += 1
            if len(yb):  # Poisson sampling may draw an empty batch: it still is a step
                total_loss += loss.item()
                batches_with_data += 1
            if mu > 0:
                with torch.no_grad():
                    for p, g in zip(model.parameters(), global_params, strict=True):
                        p.sub_(lr * mu * (p - g))
    return total_loss / max(batches_with_data, 1), steps
