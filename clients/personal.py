"""Personal models that stay at the site: Ditto and FedPer (`client.personal`).

- **Ditto** (Li et al., ICML 2021): besides training the global model as usual, a site
  keeps a personal model v and, every round it trains, also trains v on its own rows
  towards the round's global model w: loss + (lambda/2)·||v - w||² (`client.ditto_lambda`).
  v starts as the first global model the site receives.
- **FedPer** (Arivazhagan et al., 2019): the model's last layer (its head) is personal.
  The site trains the received body under its own head and replies with the trained
  body and the head exactly as it received it, so the server's model shares the body and
  never learns a site's head (its own head stays as initialised).

The personal state belongs to the site: in simulation it lives in the node's
`Context.state` (committed with every round and restored at resume, like the privacy
ledger); at a deployed site also in its state folder, one file per experiment, so it
outlives a restart. It never enters a reply; only its metrics do.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedml.arrays import from_state_dict, to_state_dict
from fedml.config import RunConfig, experiment_identity
from fedml.errors import FedmlError
from fedml.node_state import PERSONAL_DIR_KEY
from fedml.regular_files import read_bytes
from fedml.runstore import atomic_write

DITTO, FEDPER = "ditto", "fedper"
PERSONAL_RECORD = "fedml.personal"  # the node's Context.state record


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
    """The site's personal state (None before its first training round): the state
    folder's file at a data site, else the node's Context state."""
    path = _site_file(context, cfg)
    if path is not None and path.is_file():
        return load_tensors(read_bytes(path))
    if PERSONAL_RECORD in context.state.array_records:
        return to_state_dict(context.state.array_records[PERSONAL_RECORD])
    return None


def save(context: Context, cfg: RunConfig, state: dict[str, torch.Tensor]) -> None:
    """Keep the personal state in the Context state and, at a data site, in its state
    folder (atomically)."""
    tensors = {name: value.detach().cpu().contiguous() for name, value in state.items()}
    context.state[PERSONAL_RECORD] = from_state_dict(tensors)
    path = _site_file(context, cfg)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, save_tensors(tensors))


def apply(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """`model` with the personal state (a whole Ditto model, or FedPer's head) loaded."""
    model.load_state_dict({**model.state_dict(), **state}, strict=True)
    return model


def keep_shared_head(trained: ArrayRecord, received: ArrayRecord, head: list[str]) -> ArrayRecord:
    """FedPer's reply: the trained arrays with the head as received (never the site's)."""
    shared = {name: received[name] if name in head else array for name, array in trained.items()}
    return ArrayRecord(shared)


def _site_file(context: Context, cfg: RunConfig) -> Path | None:
    """A data site's file for this experiment's personal state (None in simulation)."""
    folder = context.node_config.get(PERSONAL_DIR_KEY)
    if not folder:
        return None
    identity = json.dumps(experiment_identity(cfg), sort_keys=True).encode()
    digest = hashlib.sha256(identity).hexdigest()[:16]
    return Path(str(folder)).expanduser() / f"personal-{cfg.client.personal}-{digest}.safetensors"
