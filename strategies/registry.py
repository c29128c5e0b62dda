"""Strategy names -> classes, and construction from a RunConfig."""

from __future__ import annotations

import difflib

from flwr.serverapp.strategy import Strategy

from fedml.config import RunConfig
from fedml.errors import FedmlError
from strategies.fedavg import FedAvg
from strategies.fedprox import FedProx

BUILTIN: dict[str, type[FedAvg]] = {"fedavg": FedAvg, "fedprox": FedProx}


def build_strategy(cfg: RunConfig, reproducible: bool = True) -> Strategy:
    """The strategy named by `cfg.strategy.name`, configured from the run config; with
    client-level DP (`dp.mode = "user-*"`), inside Flower's DP wrapper. `reproducible`
    lets that wrapper's noise follow the run seed (simulation only: see user_dp.py)."""
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
    strategy = BUILTIN[name](**kwargs)
    if cfg.dp.mode.startswith("user"):
        from strategies.user_dp import wrap_user_dp

        return wrap_user_dp(strategy, cfg, reproducible)
    return strategy
