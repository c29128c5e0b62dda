"""Aggregation strategies: subclasses of Flower's `flwr.serverapp.strategy.Strategy`."""

from strategies.fedavg import FedAvg
from strategies.fedprox import FedProx
from strategies.registry import BUILTIN, available, build_strategy, resolve

__all__ = ["BUILTIN", "FedAvg", "FedProx", "available", "build_strategy", "resolve"]
