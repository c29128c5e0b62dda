"""An example fedml strategy plugin: FedAvg with every client update clipped to a norm.

Install it (`pip install -e examples/plugin-fedavg-clipped`) and run

    fedml simulate --strategy fedavg-clipped          # clip_norm from [strategy], default 1

or, without installing, put this folder on PYTHONPATH and name the class:

    fedml simulate --strategy fedavg_clipped:FedAvgClipped

`clip_norm` comes from the run config's `[strategy]` table (`clip_norm = 0.5`), like any
keyword argument a plugin declares. The strategy is stateless across rounds beyond
FedAvg's own sampling RNG, which the inherited `state_dict()` already persists.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedml.arrays import from_numpy, record_of, to_numpy
from strategies import FedAvg


class FedAvgClipped(FedAvg):
    """FedAvg whose clients' updates are clipped to L2 norm `clip_norm` before averaging."""

    def __init__(self, *, clip_norm: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        self.clip_norm = clip_norm
        self.clipped = 0  # updates clipped in the latest round (for inspection)
        self._global: dict[str, np.ndarray] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model the updates are measured against."""
        self._global = {key: to_numpy(array) for key, array in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg over the clipped updates (streamed, one reply at a time)."""
        self.clipped = 0
        return super().aggregate_train(server_round, self._clip_each(replies))

    def _clip_each(self, replies: Iterable[Message]) -> Iterator[Message]:
        for reply in replies:
            if not reply.has_error():
                key = next(iter(reply.content.array_records))
                reply.content[key] = self._clip(reply.content[key])
            yield reply

    def _clip(self, arrays: ArrayRecord) -> ArrayRecord:
        values = {key: to_numpy(array) for key, array in arrays.items()}
        floats = [k for k, v in values.items() if v.dtype.kind == "f"]
        deltas = {k: values[k].astype(np.float64) - self._global[k] for k in floats}
        norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in deltas.values())))
        if norm <= self.clip_norm:
            return arrays
        self.clipped += 1
        scale = self.clip_norm / norm
        for k in floats:
            values[k] = (self._global[k] + deltas[k] * scale).astype(values[k].dtype)
        return record_of({k: from_numpy(v) for k, v in values.items()})
