"""State a site keeps between rounds and never sends: personal models (clients/personal.py)
and SCAFFOLD's control variate (clients/scaffold.py).

In simulation it lives in the node's `Context.state` (committed with every round and
restored at resume, like the privacy ledger). At a deployed site it is also a file in the
site's state folder (the node config's `state-dir`), one per experiment (named by a
hash of the run config's experiment keys), so it outlives a restart of the site and a
resumed run; another experiment starts afresh. A new run of the very same experiment
continues the state a site kept for the last one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import Context
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedml.arrays import from_state_dict, to_state_dict
from fedml.config import RunConfig, experiment_digest
from fedml.errors import FedmlError
from fedml.node_state import SITE_STATE_KEY
from fedml.regular_files import read_bytes
from fedml.runstore import atomic_write

RECORD_PREFIX = "fedml."  # + the state's name: its record in Context.state


def load(context: Context, cfg: RunConfig, name: str) -> dict[str, torch.Tensor] | None:
    """The site's kept state `name` (None before it first kept one): the state folder's
    file at a data site, else the node's Context state."""
    path = _site_file(context, cfg, name)
    if path is not None and path.is_file():
        try:
            return load_tensors(read_bytes(path))
        except Exception as exc:  # whatever a damaged file makes safetensors raise
            raise FedmlError(
                f"{path} (this site's kept {name}) cannot be read ({exc}). Remove it to "
                "start that state afresh at this site."
            ) from exc
    if RECORD_PREFIX + name in context.state.array_records:
        return to_state_dict(context.state.array_records[RECORD_PREFIX + name])
    return None


def save(context: Context, cfg: RunConfig, name: str, state: dict[str, torch.Tensor]) -> None:
    """Keep `state` in the Context state and, at a data site, in its state folder
    (atomically)."""
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    context.state[RECORD_PREFIX + name] = from_state_dict(tensors)
    path = _site_file(context, cfg, name)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, save_tensors(tensors))


def _site_file(context: Context, cfg: RunConfig, name: str) -> Path | None:
    """A data site's file for this experiment's state `name` (None in simulation)."""
    folder = context.node_config.get(SITE_STATE_KEY)
    if not folder:
        return None
    return Path(str(folder)).expanduser() / f"{name}-{experiment_digest(cfg)}.safetensors"
