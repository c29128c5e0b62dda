"""Heterogeneity scenarios that shape each round of a simulation.

`Dropout(fraction)`: in each round that fraction of the sampled clients (seeded RNG)
fails: their train messages are not delivered and they count as failed replies, which
is how users rehearse unreliable sites.

`Stragglers(fraction)`: in each round that fraction of the sampled clients (chosen by a
seeded RNG) is told to run a random number of local epochs in [1, E], as in the FedProx
paper's systems-heterogeneity setting. The round loop then drops their updates for
strategies that do not keep partial work (FedAvg) and keeps them for those that do
(FedProx).
"""

from __future__ import annotations

import random

from flwr.app import ConfigRecord, Message, RecordDict

from fedml.settings import LOCAL_EPOCHS_KEY, LOCAL_STEPS_KEY
from fedml.statefile import rng_state, set_rng_state


class SampledFraction:
    """Picks a fraction of each round's sampled clients with a seeded RNG, whose state
    the run store commits so that a resumed run picks the same clients."""

    name = "fraction"

    def __init__(self, fraction: float, seed: int) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{self.name} fraction must be in [0, 1], got {fraction}")
        self.fraction = fraction
        self.rng = random.Random(seed)

    def choose(self, messages: list[Message]) -> list[int]:
        """Indices of the chosen messages (none, and no RNG draw, when the fraction is 0)."""
        if self.fraction == 0.0 or not messages:
            return []
        return self.rng.sample(range(len(messages)), round(len(messages) * self.fraction))

    def state_dict(self) -> dict:
        return {"rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(self.rng, state["rng"])


class Stragglers(SampledFraction):
    """Assigns partial local work to a fraction of each round's sampled clients."""

    name = "straggler"

    def apply(self, messages: list[Message], full_epochs: int, full_steps: int = 0) -> set[int]:
        """Rewrite the train config of the chosen clients' messages in place
        (`local-epochs` drawn in [1, full_epochs], or with `full_steps` > 0 `local-steps`
        drawn in [1, full_steps]); return their node IDs."""
        chosen = self.choose(messages)
        for index in chosen:
            message = messages[index]
            config = ConfigRecord(dict(message.content["config"]))
            if full_steps > 0:
                config[LOCAL_STEPS_KEY] = self.rng.randint(1, full_steps)
            else:
                config[LOCAL_EPOCHS_KEY] = self.rng.randint(1, full_epochs)
            message.content = RecordDict({**message.content, "config": config})
        return {messages[i].metadata.dst_node_id for i in chosen}


class Dropout(SampledFraction):
    """A fraction of each round's sampled clients fails: their train messages are never
    delivered, as if those sites were down, so they count as failed replies."""

    name = "dropout"

    def apply(self, messages: list[Message]) -> tuple[list[Message], set[int]]:
        """(the messages still to send, the node IDs that dropped out)."""
        chosen = set(self.choose(messages))
        dropped = {messages[i].metadata.dst_node_id for i in chosen}
        return [m for i, m in enumerate(messages) if i not in chosen], dropped
