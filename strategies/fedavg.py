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
from strategies.aggregate import MetricMean, WeightedMean

log = getLogger(__name__)


class FedAvg(FlowerFedAvg):
    """Federated Averaging (McMahan et al., 2017) for fedml's round loop.

    Messages follow Flower's conventions: the global model travels as the ArrayRecord
    "arrays", the train/evaluate settings as the ConfigRecord "config" (with
    "server-round" added), and each reply carries one MetricRecord "metrics" whose
    "num-examples" weights the average. Differences from `flwr.serverapp.strategy.FedAvg`:

    - client sampling uses the strategy's own `random.Random(seed)`, so a run with the
      same seed samples the same clients (Flower's uses the global `random` module);
    - aggregation streams: each reply is folded into a float64 running sum as it comes
      (memory O(model size) however many clients reply) and each array is cast back to
      its dtype: integer buffers stay integers (rounded mean), float32 stays float32;
    - metrics are averaged key by key over the replies that report each key, so replies
      with different metric names do not make the round fail.

    With `uniform_weights` every update counts the same (client-level DP needs it: its
    noise is calibrated to clip_norm / clients); metrics stay example-weighted.

    `keeps_partial_work` tells the round loop what to do with stragglers (clients that
    ran fewer local epochs than asked): FedAvg drops them, as in the FedProx paper.
    """

    keeps_partial_work = False
    uniform_weights = False

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
        """Example-weighted mean of the replies' arrays and metrics (error replies
        skipped), folding each reply in as `replies` yields it."""
        mean, metrics = WeightedMean(), MetricMean(self.weighted_by_key)
        for reply in replies:
            if reply.has_error():
                continue
            content = reply.content
            validate_message_reply_consistency([content], self.weighted_by_key, True)
            weight = float(next(iter(content.metric_records.values()))[self.weighted_by_key])
            mean.add(
                next(iter(content.array_records.values())), 1.0 if self.uniform_weights else weight
            )
            metrics.add(next(iter(content.metric_records.values())), weight)
        if not mean.count:
            return None, None
        log.info("aggregate_train: %d replies", mean.count)
        return mean.result(), metrics.result()

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the evaluation replies' metrics (errors skipped)."""
        metrics, count = MetricMean(self.weighted_by_key), 0
        for reply in replies:
            if reply.has_error():
                continue
            content = reply.content
            validate_message_reply_consistency([content], self.weighted_by_key, False)
            record = next(iter(content.metric_records.values()))
            metrics.add(record, float(record[self.weighted_by_key]))
            count += 1
        return metrics.result() if count else None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """What later rounds depend on (the sampling RNG), for the run store."""
        return {"rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        set_rng_state(self.rng, state["rng"])
