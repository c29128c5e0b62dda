"""A site's side of SCAFFOLD (`strategies/scaffold.py`): its control variate c_i, which
it keeps (`clients.kept_state`) and never sends.

Every step of local training uses the gradient g - c_i + c (`corrections`: c - c_i per
trainable parameter, added to the gradient); after training the site keeps
c_i+ = c_i - c + (x - y) / (K lr) (`next_control`), x the received model, y the trained
one, K the optimiser steps taken (option II of the paper). It keeps the c_i the round
started from too: a retried round starts from it again (`site_control`).
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, Context

from clients import kept_state
from fedml.arrays import to_state_dict
from fedml.config import RunConfig
from fedml.errors import FedmlError

log = logging.getLogger(__name__)

CONTROL_NAME = "scaffold-control"
ROUND_KEY, AFTER, BEFORE = "round", "c/", "before/"  # the kept record's entries


def site_control(
    context: Context, cfg: RunConfig, server: ArrayRecord, server_round: int
) -> dict[str, torch.Tensor]:
    """c_i to train this round with: the kept one, or zeros the first time (shaped like
    the server's c). A round seen again (the server retried it) starts from the c_i
    kept before that round's first attempt, as the server undid its c."""
    zeros = {key: torch.zeros_like(value) for key, value in to_state_dict(server).items()}
    kept = kept_state.load(context, cfg, CONTROL_NAME)
    if kept is None or ROUND_KEY not in kept:
        return zeros
    prefix = BEFORE if int(kept[ROUND_KEY]) == server_round else AFTER
    mine = {key: kept.get(prefix + key) for key in zeros}
    if any(v is None or v.shape != zeros[k].shape for k, v in mine.items()):
        log.warning("the kept SCAFFOLD control variate does not fit the model; starting at 0")
        return zeros
    return {key: value for key, value in mine.items() if value is not None}


def keep(
    context: Context,
    cfg: RunConfig,
    server_round: int,
    before: dict[str, torch.Tensor],
    after: dict[str, torch.Tensor],
) -> None:
    """Keep c_i+ (and the c_i this round started from, for a retry of it)."""
    state = {ROUND_KEY: torch.tensor(server_round, dtype=torch.int64)}
    state.update({BEFORE + key: value for key, value in before.items()})
    state.update({AFTER + key: value for key, value in after.items()})
    kept_state.save(context, cfg, CONTROL_NAME, state)


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
