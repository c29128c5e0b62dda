"""Aggregation strategies: subclasses of Flower's `flwr.serverapp.strategy.Strategy`."""

from strategies.fedavg import FedAvg
from strategies.fedprox import FedProx
from strategies.registry import BUILTIN, build_strategy

__all__ = ["BUILTIN", "FedAvg", "FedProx", "build_strategy"]
