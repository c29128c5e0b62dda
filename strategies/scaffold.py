"""SCAFFOLD (Karimireddy et al., ICML 2020): FedAvg with control variates against drift."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedml.arrays import from_numpy, record_of, to_numpy
from fedml.settings import CONTROL_RECORD, TrainSettings
from strategies.fedavg import FedAvg


class Scaffold(FedAvg):
    """SCAFFOLD (Karimireddy et al., 2020): FedAvg whose sites correct their local steps
    by control variates, so sites whose data differ drift less from the global optimum.

    The server keeps the control variate c (one array per floating array of the model,
    zero at first) and sends it with every train message as the ArrayRecord "control".
    Each site keeps its own c_i (zero at first, never sent), trains with the gradient
    g - c_i + c at every step, and updates c_i+ = c_i - c + (x - y_i) / (K_i lr): x the
    received model, y_i the trained one, K_i its optimiser steps (option II of the
    paper). The reply is FedAvg's: the trained arrays and "num-examples".

    The server needs no second array from a site: c_i+ - c_i = (x - y_i) / (K_i lr) - c,
    and K_i = local epochs x ceil(num-examples / batch size) (or the run's local steps)
    is what an honest site's loop runs (`TrainSettings.steps_for`). So after each round
    c += (|S| / N) x mean over the S replies of ((x - y_i) / (K_i lr) - c), N being the
    connected sites. A site could inflate its term by understating its examples (a
    smaller K_i); each term is therefore clipped to `drift_factor` times the round's
    median term norm, as updates are screened against the median update (the round's
    terms are held at once for that: O(replies x model)).

    The paper's invariant c = mean of the sites' c_i holds while every sampled site's
    reply is aggregated as the site computed it; a reply the server leaves out (rejected,
    timed out, a dropped straggler) or changes (a capped weight claim, a clipped term)
    has moved that site's c_i without moving c alike. A retried round is safe: c is
    undone with the discarded attempt, and a site that sees the same round again starts
    from the c_i it had before it (`clients/scaffold.py`). The correction assumes plain
    SGD at the sites (`client.optimizer` sgd, momentum 0); the config refuses other
    optimisers, DP, secure aggregation (the server would see only the sum of updates,
    not each site's step count), server-side clipping and FedPer. c is committed with
    every round (`state_dict`).
    """

    def __init__(self, *, drift_factor: float = 10.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not drift_factor > 0:
            raise ValueError(f"drift_factor must be > 0, got {drift_factor}")
        self.drift_factor = drift_factor
        self.control: dict[str, np.ndarray] | None = None
        self._before_attempt: dict[str, np.ndarray] | None = None
        self._round: _RoundPlan | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages, each carrying the control variate c."""
        model = {key: to_numpy(array) for key, array in arrays.items()}
        if self.control is None:
            self.control = {
                key: np.zeros(values.shape, dtype=np.float64)
                for key, values in model.items()
                if np.issubdtype(values.dtype, np.floating)
            }
        self._before_attempt = copy.deepcopy(self.control)
        self._round = _RoundPlan(
            {key: model[key].astype(np.float64) for key in self.control},
            TrainSettings.from_record(config, TrainSettings()),
            sites=len(list(grid.get_node_ids())),
        )
        control = record_of(  # in the model's order (the committed state is sorted)
            {
                key: from_numpy(self.control[key].astype(values.dtype))
                for key, values in model.items()
                if key in self.control
            }
        )
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for message in messages:
            message.content[CONTROL_RECORD] = control
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's mean, and c moved by the replies' control-variate changes."""
        drifts: list[dict[str, np.ndarray]] = []
        arrays, metrics = super().aggregate_train(server_round, self._observe(replies, drifts))
        if arrays is None or not drifts or self._round is None or self.control is None:
            return arrays, metrics
        total = _clipped_sum(drifts, self.drift_factor)
        share = len(drifts) / max(self._round.sites, len(drifts))
        for key, summed in total.items():
            mean_change = summed / len(drifts) - self.control[key]
            self.control[key] = self.control[key] + share * mean_change
        return arrays, metrics

    def _observe(
        self, replies: Iterable[Message], drifts: list[dict[str, np.ndarray]]
    ) -> Iterator[Message]:
        """Pass the replies on to FedAvg's fold, keeping each good one's drift term."""
        for reply in replies:
            drift = self.drift_of(reply)
            if drift is not None:
                drifts.append(drift)
            yield reply

    def drift_of(self, reply: Message) -> dict[str, np.ndarray] | None:
        """(x - y_i) / (K_i lr) of one good reply: its c_i+ - c_i + c."""
        if reply.has_error() or self._round is None:
            return None
        plan = self._round
        trained = next(iter(reply.content.array_records.values()))
        claimed = next(iter(reply.content.metric_records.values())).get(self.weighted_by_key)
        steps = plan.settings.steps_for(int(claimed or 0))
        if steps < 1:
            return None
        scale = 1.0 / (steps * plan.settings.lr)
        return {
            key: (start - to_numpy(trained[key]).astype(np.float64)) * scale
            for key, start in plan.model.items()
        }

    def discard_attempt(self) -> None:
        """The round loop threw the attempt away: c goes back to its value before it."""
        if self._before_attempt is not None:
            self.control = copy.deepcopy(self._before_attempt)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        control = self.control or {}
        state["control"] = {key: control[key] for key in sorted(control)} or None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        stored = state.get("control")
        self.control = None if stored is None else {k: np.asarray(v) for k, v in stored.items()}


@dataclass(frozen=True)
class _RoundPlan:
    """What the server sent this round: the model x (floating arrays, float64), the
    training settings (the learning rate, the steps a site takes), and how many sites
    are connected."""

    model: dict[str, np.ndarray]
    settings: TrainSettings
    sites: int


def _clipped_sum(drifts: list[dict[str, np.ndarray]], factor: float) -> dict[str, np.ndarray]:
    """The sum of the drift terms, each clipped to `factor` x their median norm."""
    norms = [math.sqrt(sum(float(np.sum(v * v)) for v in d.values())) for d in drifts]
    bound = factor * float(np.median(norms))
    total: dict[str, np.ndarray] = {}
    for drift, norm in zip(drifts, norms, strict=True):
        scale = bound / norm if norm > bound else 1.0
        for key, value in drift.items():
            total[key] = total.get(key, 0.0) + value * scale
    return total
