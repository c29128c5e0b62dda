"""FedAvg on Flower's Message API, with seeded client sampling and dtype-true averaging."""

from __future__ import annotations

from collections.abc import Iterable
from logging import getLogger

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from strategies.aggregate import MetricMean, WeightedMean
from strategies.sampling import SeededSampling

log = getLogger(__name__)


class FedAvg(SeededSampling, FlowerFedAvg):
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

    Plugins (strategies/registry.py has the whole contract): subclass this (or Flower's
    `Strategy`), take your options as keyword arguments (they come from the run
    config's `[strategy]` table), keep cross-round state in `state_dict()` /
    `load_state_dict()` (committed every round), and register the class under the
    entry-point group `fedml.strategies` or name it as `module:Class`.
    """

    keeps_partial_work = False
    uniform_weights = False

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
