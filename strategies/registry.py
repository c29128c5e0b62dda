"""Strategy names -> classes, and construction from a RunConfig."""

from __future__ import annotations

import difflib

from flwr.serverapp.strategy import Strategy

from fedml.config import RunConfig
from fedml.errors import FedmlError
from strategies.fedavg import FedAvg
from strategies.fedprox import FedProx

BUILTIN: dict[str, type[FedAvg]] = {"fedavg": FedAvg, "fedprox": FedProx}


def build_strategy(cfg: RunConfig) -> Strategy:
    """The strategy named by `cfg.strategy.name`, configured from the run config."""
    name = cfg.strategy.name.lower()
    if name not in BUILTIN:
        close = difflib.get_close_matches(name, BUILTIN, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise FedmlError(
            f"Unknown strategy '{cfg.strategy.name}'.{hint} Available: {', '.join(BUILTIN)}."
        )
    s = cfg.strategy
    kwargs = dict(
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=s.min_train_clients,
        min_evaluate_nodes=s.min_evaluate_clients if s.fraction_evaluate > 0 else 0,
        min_available_nodes=1,
        seed=cfg.seed,
    )
    if name == "fedprox":
        kwargs["proximal_mu"] = s.proximal_mu
    return BUILTIN[name](**kwargs)
