"""What a train message asks of a client: one definition, owning its message keys.

The server writes a round's `TrainSettings` into the train message's ConfigRecord
"config" (`to_record`); the ClientApp reads it back (`from_record`). Keys are the field
names with dashes (`local_epochs` -> "local-epochs"), Flower's convention for message
config, so a stock Flower strategy's "proximal-mu" means the same here. A key a message
lacks falls back to the run config's value: a plain Flower strategy that sends only
"server-round" still trains as configured.

The defaults are `ClientConfig`'s (a run without a `[client]` table trains with exactly
what `TrainSettings()` holds).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from flwr.app import ConfigRecord

from fedml.config import ClientConfig

NUM_CLASSES_KEY = "num-classes"  # the model's output size (a site cannot tell from its labels)
FINE_TUNE_KEY = "fine-tune-epochs"  # an evaluate message: fine-tune a personal model first
SERVER_ROUND_KEY = "server-round"  # added by every strategy's configure_train/evaluate
CONTROL_RECORD = "control"  # a train message's ArrayRecord: SCAFFOLD's control variate c

_client = ClientConfig()


@dataclass(frozen=True)
class TrainSettings:
    """One local training job: epochs (or, with `local_steps` > 0, that many steps) of
    minibatch SGD or Adam, with FedProx's proximal term when `proximal_mu` > 0."""

    local_epochs: int = _client.local_epochs
    local_steps: int = _client.local_steps
    batch_size: int = _client.batch_size
    lr: float = _client.lr
    optimizer: str = _client.optimizer
    momentum: float = _client.momentum
    weight_decay: float = _client.weight_decay
    proximal_mu: float = 0.0

    @classmethod
    def for_round(cls, client: ClientConfig, lr: float) -> TrainSettings:
        """The run's `[client]` settings with this round's learning rate (decayed, and
        scaled by the divergence guard); the strategy adds its own (FedProx's mu)."""
        return cls(
            local_epochs=client.local_epochs,
            local_steps=client.local_steps,
            batch_size=client.batch_size,
            lr=lr,
            optimizer=client.optimizer,
            momentum=client.momentum,
            weight_decay=client.weight_decay,
        )

    def to_record(self, num_classes: int) -> ConfigRecord:
        """The train message's config: the model's output size and every setting, except
        a zero `proximal_mu` (the strategy that uses mu sends it, FedProx, and a plugin
        may test whether the key is there) and a zero `local_steps` (epochs decide)."""
        values = {
            message_key(name): value
            for name, value in dataclasses.asdict(self).items()
            if not (name in ("proximal_mu", "local_steps") and value == 0)
        }
        return ConfigRecord({NUM_CLASSES_KEY: num_classes, **values})

    def steps_for(self, rows: int) -> int:
        """How many optimiser steps local training takes on `rows` rows (SCAFFOLD's
        K): `local_steps`, else `local_epochs` passes of ceil(rows / batch_size)."""
        if rows <= 0:
            return 0
        if self.local_steps > 0:
            return self.local_steps
        return self.local_epochs * math.ceil(rows / self.batch_size)

    @classmethod
    def from_record(cls, record: ConfigRecord, defaults: TrainSettings) -> TrainSettings:
        """The settings a message asks for; a key it lacks keeps `defaults`' value."""
        values = {}
        for f in dataclasses.fields(cls):
            kind = type(getattr(defaults, f.name))
            values[f.name] = kind(record.get(message_key(f.name), getattr(defaults, f.name)))
        return cls(**values)


def message_key(field_name: str) -> str:
    """The message config key of a `TrainSettings` field ("local_epochs" -> "local-epochs")."""
    return field_name.replace("_", "-")


LOCAL_EPOCHS_KEY = message_key("local_epochs")
LOCAL_STEPS_KEY = message_key("local_steps")
PROXIMAL_MU_KEY = message_key("proximal_mu")
