"""FedAvg on Flower's Message API, with seeded client sampling and dtype-true averaging."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from logging import getLogger

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from fedml.statefile import rng_state, set_rng_state
from strategies.aggregate import WeightedMean

log = getLogger(__name__)


class FedAvg(FlowerFedAvg):
    """Federated Averaging (McMahan et al., 2017) for fedml's round loop.

    Messages follow Flower's conventions: the global model travels as the ArrayRecord
    "arrays", the train/evaluate settings as the ConfigRecord "config" (with
    "server-round" added), and each reply carries one MetricRecord "metrics" whose
    "num-examples" weights the average. Differences from `flwr.serverapp.strategy.FedAvg`:

    - client sampling uses the strategy's own `random.Random(seed)`, so a run with the
      same seed samples the same clients (Flower's uses the global `random` module);
    - aggregation streams replies into a float64 running sum and casts each array back to
      its dtype: integer buffers stay integers (rounded mean), float32 stays float32.

    `keeps_partial_work` tells the round loop what to do with stragglers (clients that
    ran fewer local epochs than asked): FedAvg drops them, as in the FedProx paper.
    """

    keeps_partial_work = False

    def __init__(self, *, seed: int = 0, **kwargs) -> None:
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
        config["server-round"] = server_round
        return self._messages(arrays, config, nodes, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients and send them the global arrays to evaluate."""
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self.sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        config["server-round"] = server_round
        return self._messages(arrays, config, nodes, MessageType.EVALUATE)

    def sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        """Sample max(minimum, fraction * connected) nodes with the strategy's RNG,
        waiting (1 s steps, as Flower does) until enough nodes are connected."""
        nodes = sorted(grid.get_node_ids())
        size = max(int(len(nodes) * fraction), minimum)
        while len(nodes) < max(size, self.min_available_nodes):
            log.info("Waiting for nodes: %d connected, %d needed", len(nodes), size)
            time.sleep(1)
            nodes = sorted(grid.get_node_ids())
        return sorted(self.rng.sample(nodes, size))

    def _messages(
        self, arrays: ArrayRecord, config: ConfigRecord, nodes: list[int], kind: str
    ) -> list[Message]:
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=content, message_type=kind, dst_node_id=n) for n in nodes]

    # ------------------------------------------------------------------ aggregate
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Example-weighted mean of the replies' arrays and metrics (error replies skipped)."""
        contents = [msg.content for msg in replies if not msg.has_error()]
        if not contents:
            return None, None
        validate_message_reply_consistency(contents, self.weighted_by_key, check_arrayrecord=True)
        mean = WeightedMean()
        for content in contents:
            arrays = next(iter(content.array_records.values()))
            metrics = next(iter(content.metric_records.values()))
            mean.add(arrays, float(metrics[self.weighted_by_key]))
        log.info("aggregate_train: %d replies", len(contents))
        return mean.result(), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """What later rounds depend on (the sampling RNG), for the run store."""
        return {"rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        set_rng_state(self.rng, state["rng"])
