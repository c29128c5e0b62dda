"""FedProx (Li et al., 2020): FedAvg plus a proximal term at the clients."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedml.settings import PROXIMAL_MU_KEY
from strategies.fedavg import FedAvg


class FedProx(FedAvg):
    """FedProx (Li et al., 2020): FedAvg plus a proximal term mu at the clients.

    It sends `config["proximal-mu"]`; clients minimise

        loss(w) + (mu / 2) * ||w - w_global||^2

    with the SQUARED norm, as in the paper (Flower's docstring example omits the square).
    Unlike FedAvg it keeps stragglers' partial work (fewer local epochs than asked): the
    proximal term is what makes those variable-length updates safe to average.
    """

    keeps_partial_work = True

    def __init__(self, *, proximal_mu: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
        self.proximal_mu = proximal_mu

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages with "proximal-mu" in the config."""
        config[PROXIMAL_MU_KEY] = float(self.proximal_mu)
        return super().configure_train(server_round, arrays, config, grid)
