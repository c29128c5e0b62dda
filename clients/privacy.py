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
- at a deployed data site, also in a JSON file named by the node config key
  "privacy-ledger" (written atomically after every round). The file is the site's
  lifetime ledger: it outlives SuperNode restarts and runs, and every run that trains on
  the site's data spends from the same budget.

Before training, the client projects the epsilon it would reach after the round; above
the budget (`dp.max_epsilon`, else `dp.target_epsilon`) it declines with a
`PrivacyBudgetExhausted` error instead of training.

Opacus is imported only inside the functions here, and this module only when DP is on
(importing Opacus costs about 5 s).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import ConfigRecord, Context
from torch import nn

from clients.trainer import TrainResult, make_optimizer, to_tensors
from fedml.errors import FedmlError
from fedml.privacy import (
    HistoryEntry,
    budget,
    epsilon_of,
    planned_delta,
    planned_noise,
    with_steps,
)
from fedml.runstore import atomic_write
from fedml.settings import TrainSettings

if TYPE_CHECKING:
    from fedml.config import DPConfig
    from fedml.data import Shard

LEDGER_RECORD = "privacy-ledger"  # Context.state record, and the node config key of the file
LEDGER_FORMAT = 1


class PrivacyBudgetExhausted(Exception):
    """Training this round would take the client's epsilon past its budget."""


@dataclass
class PrivacyLedger:
    """What one client has spent: the accountant history and the rounds it trained in.

    `noise_multiplier` is the noise of its latest round; with a target epsilon, that is
    the noise derived at its first training, which later rounds (and a resumed run) reuse
    so that the plan holds.
    """

    history: list[HistoryEntry] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    noise_multiplier: float = 0.0

    def epsilon(self, accountant: str, delta: float) -> float:
        """Epsilon spent so far, at `delta`, by Opacus's `accountant` ("rdp"/"prv")."""
        return epsilon_of(tuple(self.history), accountant, delta)

    def projected(self, noise: float, sample_rate: float, steps: int) -> list[HistoryEntry]:
        """The history after `steps` more steps, merged as Opacus's accountant does."""
        return with_steps(self.history, noise, sample_rate, steps)

    # -- persistence ----------------------------------------------------------------------
    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "noise": [float(n) for n, _, _ in self.history],
                "sample-rate": [float(q) for _, q, _ in self.history],
                "steps": [int(s) for _, _, s in self.history],
                "rounds": [int(r) for r in self.rounds],
                "noise-multiplier": float(self.noise_multiplier),
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> PrivacyLedger:
        history = zip(record["noise"], record["sample-rate"], record["steps"], strict=True)
        return cls(
            history=[(float(n), float(q), int(s)) for n, q, s in history],
            rounds=[int(r) for r in record["rounds"]],
            noise_multiplier=float(record["noise-multiplier"]),
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": LEDGER_FORMAT,
                "history": [list(entry) for entry in self.history],
                "rounds": self.rounds,
                "noise_multiplier": self.noise_multiplier,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, source: Path) -> PrivacyLedger:
        """Parse a ledger file; anything unexpected is a clear error, never a reset."""
        try:
            data = json.loads(text)
            if data.get("format") != LEDGER_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {LEDGER_FORMAT}")
            history = [(float(n), float(q), int(s)) for n, q, s in data["history"]]
            return cls(history, [int(r) for r in data["rounds"]], float(data["noise_multiplier"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FedmlError(
                f"Privacy ledger {source} is unreadable ({exc}). It records what this site "
                "has spent, so it is never replaced silently: restore it from a backup, "
                "or move it away only if this site's data has never been trained on."
            ) from exc


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class RoundPlan:
    """One client's DP-SGD round: the noise, Poisson sample rate, steps, and epsilons."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon_after: float
    history_before: tuple[HistoryEntry, ...]
    history_after: tuple[HistoryEntry, ...]


def plan_round(
    dp: DPConfig,
    ledger: PrivacyLedger,
    num_examples: int,
    settings: TrainSettings,
    planned_rounds: int,
) -> RoundPlan:
    """What this round will spend. Opacus samples each batch with probability
    q = 1 / ceil(n / batch_size) and takes ceil(n / batch_size) steps per epoch. With a
    target epsilon the noise is derived for `planned_rounds` rounds at the client's first
    training and read back from the ledger afterwards."""
    batches = math.ceil(num_examples / settings.batch_size)
    sample_rate, steps = 1.0 / batches, settings.local_epochs * batches
    delta = planned_delta(dp, num_examples)
    derived = ledger.noise_multiplier if dp.target_epsilon > 0 else None  # kept once derived
    noise = derived or planned_noise(dp, delta, sample_rate, planned_rounds * steps)
    after = tuple(ledger.projected(noise, sample_rate, steps))
    return RoundPlan(
        noise_multiplier=noise,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        epsilon_after=epsilon_of(after, dp.accountant, delta),
        history_before=tuple(ledger.history),
        history_after=after,
    )


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
def load_ledger(context: Context) -> PrivacyLedger:
    """The node's ledger: the site's file when the node config names one (it survives
    restarts), else the Context state, else a fresh ledger."""
    path = ledger_path(context)
    if path is not None and path.exists():
        return PrivacyLedger.from_json(path.read_text(), path)
    if LEDGER_RECORD in context.state.config_records:
        return PrivacyLedger.from_record(context.state.config_records[LEDGER_RECORD])
    return PrivacyLedger()


def save_ledger(context: Context, ledger: PrivacyLedger) -> None:
    """Keep the ledger in the Context state and, at a site, in its file (atomically)."""
    context.state[LEDGER_RECORD] = ledger.to_record()
    path = ledger_path(context)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, ledger.to_json().encode())


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
