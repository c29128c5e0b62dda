"""A site's side of SCAFFOLD (`strategies/scaffold.py`): its control variate c_i, which
it keeps (`clients.kept_state`) and never sends.

Every step of local training uses the gradient g - c_i + c (`corrections`: c - c_i per
trainable parameter, added to the gradient); after training the site keeps
c_i+ = c_i - c + (x - y) / (K lr) (`next_control`), x the received model, y the trained
one, K the optimiser steps taken (option II of the paper).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context

from clients import kept_state
from fedml.arrays import to_state_dict
from fedml.config import RunConfig
from fedml.errors import FedmlError

CONTROL_NAME = "scaffold-control"


def site_control(context: Context, cfg: RunConfig, server: ArrayRecord) -> dict[str, torch.Tensor]:
    """c_i: the kept one, or zeros the first time (shaped like the server's c)."""
    kept = kept_state.load(context, cfg, CONTROL_NAME)
    if kept is not None and set(kept) == set(server.keys()):
        return kept
    return {key: torch.zeros_like(value) for key, value in to_state_dict(server).items()}


def corrections(
    model: torch.nn.Module, server: ArrayRecord, mine: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """c - c_i for each trainable parameter of `model`."""
    c = to_state_dict(server)
    found = {name for name, _ in model.named_parameters()}
    if not found <= set(c):
        raise FedmlError(
            "The server's SCAFFOLD control variate does not cover this site's model "
            f"(missing {sorted(found - set(c))[:3]}): the server and the site run "
            "different models."
        )
    return {
        name: (c[name] - mine[name]).to(torch.float32) for name, p in model.named_parameters()
        if p.requires_grad
    }  # fmt: skip


def next_control(
    mine: dict[str, torch.Tensor],
    server: ArrayRecord,
    received: ArrayRecord,
    trained: torch.nn.Module,
    steps: int,
    lr: float,
) -> dict[str, torch.Tensor]:
    """c_i+ = c_i - c + (x - y) / (K lr)."""
    c, x = to_state_dict(server), to_state_dict(received)
    y = trained.state_dict()
    scale = 1.0 / (max(steps, 1) * lr)
    return {
        key: mine[key]
        - c[key]
        + (x[key].double() - y[key].detach().cpu().double()).to(c[key].dtype) * scale
        for key in c
    }
