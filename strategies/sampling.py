"""Seeded client sampling for Flower strategies, and its state for the run store.

Flower's strategies sample nodes with the global `random` module, so two runs with the
same seed sample different clients and a resumed run cannot continue the sequence.
`SeededSampling` goes first in a strategy's bases and replaces `configure_train` /
`configure_evaluate` with the same messages (Flower's conventions: the global model as
the ArrayRecord "arrays", the settings plus "server-round" as the ConfigRecord "config")
sent to nodes drawn by the strategy's own `random.Random(seed)`, whose state
`state_dict()` carries.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from logging import getLogger
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedml.settings import SERVER_ROUND_KEY
from fedml.statefile import rng_state, set_rng_state

log = getLogger(__name__)

# The longest a round waits for enough connected nodes. A deployed site that died is not
# coming back (Flower marks it offline about a minute after its last heartbeat), so the
# round then goes on with the nodes it has, and the participation rules (min_replies,
# retry/skip/stop) judge whether their replies are enough. Flower's own wait is endless.
NODE_WAIT_SECONDS = 60.0


class SeededSampling:
    """Mixin for a Flower strategy (it reads the strategy's `fraction_*`,
    `min_*_nodes`, `min_available_nodes`, `arrayrecord_key`, `configrecord_key`)."""

    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    arrayrecord_key: str
    configrecord_key: str
    node_wait: float = NODE_WAIT_SECONDS

    def __init__(self, *, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rng = random.Random(seed)

    # ------------------------------------------------------------------ configure
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients and send them the global arrays and the train config."""
        if self.fraction_train == 0.0:
            return []
        nodes = self.sample(grid, self.fraction_train, self.min_train_nodes)
        config[SERVER_ROUND_KEY] = server_round
        return self._messages(arrays, config, nodes, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients and send them the global arrays to evaluate."""
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self.sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        config[SERVER_ROUND_KEY] = server_round
        return self._messages(arrays, config, nodes, MessageType.EVALUATE)

    def sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        """Sample max(minimum, fraction * connected) nodes with the strategy's RNG,
        waiting (1 s steps, as Flower does) until enough nodes are connected, but at
        most `node_wait` seconds: then every connected node is sampled."""
        nodes = sorted(grid.get_node_ids())
        size = max(int(len(nodes) * fraction), minimum)
        deadline = time.monotonic() + self.node_wait
        while len(nodes) < max(size, self.min_available_nodes):
            if time.monotonic() >= deadline:
                log.warning(
                    "%d node(s) connected, %d wanted; waited %.0f s, going on with them",
                    len(nodes), size, self.node_wait,
                )  # fmt: skip
                size = min(size, len(nodes))
                break
            log.info("Waiting for nodes: %d connected, %d needed", len(nodes), size)
            time.sleep(1)
            nodes = sorted(grid.get_node_ids())
        return sorted(self.rng.sample(nodes, size))

    def _messages(
        self, arrays: ArrayRecord, config: ConfigRecord, nodes: list[int], kind: str
    ) -> list[Message]:
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=content, message_type=kind, dst_node_id=n) for n in nodes]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """What later rounds depend on (the sampling RNG), for the run store."""
        return {"rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        set_rng_state(self.rng, state["rng"])
