"""Heterogeneity scenarios that shape each round of a simulation.

`Stragglers(fraction)`: in each round that fraction of the sampled clients (chosen by a
seeded RNG) is told to run a random number of local epochs in [1, E], as in the FedProx
paper's systems-heterogeneity setting. The round loop then drops their updates for
strategies that do not keep partial work (FedAvg) and keeps them for those that do
(FedProx).
"""

from __future__ import annotations

import random

from flwr.app import ConfigRecord, Message, RecordDict

from fedml.statefile import rng_state, set_rng_state


class Stragglers:
    """Assigns partial local work to a fraction of each round's sampled clients."""

    def __init__(self, fraction: float, seed: int) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"straggler fraction must be in [0, 1], got {fraction}")
        self.fraction = fraction
        self.rng = random.Random(seed)

    def apply(self, messages: list[Message], full_epochs: int) -> set[int]:
        """Rewrite the train config of the chosen clients' messages in place
        (`local-epochs` drawn in [1, full_epochs]); return their node IDs."""
        if self.fraction == 0.0 or not messages:
            return set()
        count = round(len(messages) * self.fraction)
        chosen = self.rng.sample(range(len(messages)), count)
        for index in chosen:
            message = messages[index]
            config = ConfigRecord(dict(message.content["config"]))
            config["local-epochs"] = self.rng.randint(1, full_epochs)
            message.content = RecordDict({**message.content, "config": config})
        return {messages[i].metadata.dst_node_id for i in chosen}

    def state_dict(self) -> dict:
        """The RNG state, so a resumed run picks the same stragglers."""
        return {"rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(self.rng, state["rng"])
