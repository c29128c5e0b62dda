"""Personal models that stay at the site: Ditto and FedPer (`client.personal`).

- **Ditto** (Li et al., ICML 2021): besides training the global model as usual, a site
  keeps a personal model v and, every round it trains, also trains v on its own rows
  towards the round's global model w: loss + (lambda/2)·||v - w||² (`client.ditto_lambda`).
  v starts as the first global model the site receives.
- **FedPer** (Arivazhagan et al., 2019): the model's last layer (its head) is personal.
  The site trains the received body under its own head and replies with the trained
  body and the head exactly as it received it, so the server's model shares the body and
  never learns a site's head (its own head stays as initialised).

The personal state belongs to the site (`clients.kept_state`: the node's committed
`Context.state` in simulation, a file in the state folder at a deployed site). It never
enters a reply; only its metrics do.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context

from clients import kept_state
from fedml.arrays import record_of
from fedml.config import RunConfig
from fedml.errors import FedmlError

DITTO, FEDPER = "ditto", "fedper"


def head_names(model: torch.nn.Module) -> list[str]:
    """The parameter names of the model's last layer with parameters (FedPer's head)."""
    names = [name for name, _ in model.named_parameters()]
    if not names:
        raise FedmlError("client.personal = 'fedper' needs a model with parameters.")
    layer = names[-1].rpartition(".")[0]
    head = [n for n in names if n.rpartition(".")[0] == layer]
    if len(head) == len(names):
        raise FedmlError(
            "client.personal = 'fedper' keeps the model's last layer at each site and "
            "shares the rest, but this model has only one layer (nothing to share). Use a "
            "model with hidden layers (--model mlp), or --personal ditto."
        )
    return head


def load(context: Context, cfg: RunConfig) -> dict[str, torch.Tensor] | None:
    """The site's personal state (None before its first training round)."""
    return kept_state.load(context, cfg, _name(cfg))


def save(context: Context, cfg: RunConfig, state: dict[str, torch.Tensor]) -> None:
    """Keep the site's personal state (`clients.kept_state`: never sent)."""
    kept_state.save(context, cfg, _name(cfg), state)


def apply(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """`model` with the personal state (a whole Ditto model, or FedPer's head) loaded."""
    model.load_state_dict({**model.state_dict(), **state}, strict=True)
    return model


def keep_shared_head(trained: ArrayRecord, received: ArrayRecord, head: list[str]) -> ArrayRecord:
    """FedPer's reply: the trained arrays with the head as received (never the site's)."""
    return record_of({name: received[name] if name in head else a for name, a in trained.items()})


def _name(cfg: RunConfig) -> str:
    return f"personal-{cfg.client.personal}"
