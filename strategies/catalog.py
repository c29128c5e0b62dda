"""Flower's strategies, adapted to fedml's round loop: the built-in catalog.

Each class here is Flower's strategy (its aggregation math untouched) with what fedml's
loop needs:

- seeded client sampling (`SeededSampling`) and its RNG in `state_dict()`;
- the server optimiser's reference point: FedAvgM and the FedOpt family keep
  `current_arrays`; it is set to the global model each round (Flower keeps its own
  running copy, which drifts from the real global model once fedml's validation,
  divergence guard or server optimiser acts);
- optimiser state (FedAvgM's `momentum_vector`, FedOpt's `m_t`/`v_t`) in `state_dict()`,
  so a resumed run is bit-identical, and undone by `discard_attempt()` when the round
  loop throws an aggregated attempt away (divergence rollback, too few updates);
- dtypes kept: Flower's helpers return float64 for integer buffers and may widen float32;
  each aggregated array is cast back to the global model's dtype (integers rounded).

They aggregate a round's replies as a list (median, trimmed mean and Krum need them all),
so unlike fedml's FedAvg they hold every update of a round at once.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Bulyan as FlowerBulyan
from flwr.serverapp.strategy import FedAdagrad as FlowerFedAdagrad
from flwr.serverapp.strategy import FedAdam as FlowerFedAdam
from flwr.serverapp.strategy import FedAvgM as FlowerFedAvgM
from flwr.serverapp.strategy import FedMedian as FlowerFedMedian
from flwr.serverapp.strategy import FedTrimmedAvg as FlowerFedTrimmedAvg
from flwr.serverapp.strategy import FedYogi as FlowerFedYogi
from flwr.serverapp.strategy import Krum as FlowerKrum
from flwr.serverapp.strategy import MultiKrum as FlowerMultiKrum

from fedml.arrays import from_numpy, record_of, to_numpy
from strategies.aggregate import cast_like
from strategies.sampling import SeededSampling


class CatalogAdapter(SeededSampling):
    """What every catalog strategy shares: seeded sampling, dtype-true results, and
    optimiser state that is committed and can be rolled back (`OPTIMISER_STATE`)."""

    OPTIMISER_STATE: tuple[str, ...] = ()
    # (a, b): resisting f Byzantine clients needs a round of at least a * f + b replies
    BYZANTINE_QUORUM: tuple[int, int] | None = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._dtypes: dict[str, np.dtype] = {}
        self._before_attempt: dict[str, Any] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model (dtypes, optimiser reference point, state before
        this attempt), then sample and send as fedml's FedAvg does."""
        self._dtypes = {key: to_numpy(array).dtype for key, array in arrays.items()}
        self._before_attempt = copy.deepcopy(self._optimiser_state())
        self.set_reference(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def set_reference(self, arrays: ArrayRecord) -> None:
        """Point the server optimiser at the global model (strategies that have one)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, list(replies))  # type: ignore[misc]
        return (None if arrays is None else self._with_global_dtypes(arrays)), metrics

    def _with_global_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        cast = {}
        for key, array in arrays.items():
            values = to_numpy(array)
            cast[key] = from_numpy(cast_like(values, self._dtypes.get(key, values.dtype)))
        return record_of(cast)

    def discard_attempt(self) -> None:
        """The round loop threw the last aggregated attempt away: undo its optimiser
        step, so a retried round starts from the state the rejected one started from."""
        for name, value in copy.deepcopy(self._before_attempt).items():
            setattr(self, name, value)

    def _optimiser_state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.OPTIMISER_STATE}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for name, value in self._optimiser_state().items():
            state[name] = _arrays_of(value)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for name in self.OPTIMISER_STATE:
            setattr(self, name, _restore(state[name]))


def _arrays_of(value: Any) -> Any:
    """Optimiser state as storable values: None, a list or a dict of ndarrays (keys
    sorted, so a resumed run, whose dicts come back in stored order, writes the same)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {key: np.asarray(value[key]) for key in sorted(value)}
    return [np.asarray(v) for v in value]


def _restore(stored: Any) -> Any:
    if stored is None:
        return None
    if isinstance(stored, dict):
        return dict(stored)
    return list(stored)


class FedAvgM(CatalogAdapter, FlowerFedAvgM):
    """FedAvgM (Hsu et al., 2019): FedAvg with server momentum, Flower's implementation.

    Options: `server_learning_rate` (1.0), `server_momentum` (0.0).
    """

    OPTIMISER_STATE = ("momentum_vector",)

    def set_reference(self, arrays: ArrayRecord) -> None:
        self.current_arrays = arrays


class _FedOptReference:
    """FedOpt keeps the global model as a dict of ndarrays."""

    OPTIMISER_STATE = ("m_t", "v_t")

    def set_reference(self, arrays: ArrayRecord) -> None:
        self.current_arrays = {key: to_numpy(array) for key, array in arrays.items()}


class FedAdam(_FedOptReference, CatalogAdapter, FlowerFedAdam):
    """FedAdam (Reddi et al., 2021): Adam on the server over the averaged update, Flower's.

    Options: `eta` (server lr, 0.1), `beta_1` (0.9), `beta_2` (0.99), `tau` (1e-3).
    """


class FedYogi(_FedOptReference, CatalogAdapter, FlowerFedYogi):
    """FedYogi (Reddi et al., 2021): Yogi on the server over the averaged update, Flower's.

    Options: `eta` (server lr, 0.01), `beta_1` (0.9), `beta_2` (0.99), `tau` (1e-3).
    """


class FedAdagrad(_FedOptReference, CatalogAdapter, FlowerFedAdagrad):
    """FedAdagrad (Reddi et al., 2021): Adagrad on the server over the averaged update.

    Options: `eta` (server lr, 0.1), `tau` (1e-3). Flower's implementation.
    """


class FedMedian(CatalogAdapter, FlowerFedMedian):
    """FedMedian (Yin et al., 2018): coordinate-wise median of the updates, Flower's."""


class FedTrimmedAvg(CatalogAdapter, FlowerFedTrimmedAvg):
    """FedTrimmedAvg (Yin et al., 2018): coordinate-wise mean without the `beta` (0.2)
    largest and smallest fractions, Flower's implementation."""


class Krum(CatalogAdapter, FlowerKrum):
    """Krum (Blanchard et al., 2017): the update closest to its neighbours, robust to
    `num_malicious_nodes` (0) Byzantine clients when there are at least 2 x that + 3
    replies; Flower's implementation."""

    BYZANTINE_QUORUM = (2, 3)


class MultiKrum(CatalogAdapter, FlowerMultiKrum):
    """Multi-Krum (Blanchard et al., 2017): the mean of the `num_nodes_to_select` (1)
    updates closest to their neighbours, robust to `num_malicious_nodes` (0) Byzantine
    clients (at least 2 x that + 3 replies); Flower's implementation. Averaging several
    keeps more of the honest sites' data than Krum's single pick (which alone can stall
    on non-IID data)."""

    BYZANTINE_QUORUM = (2, 3)


class Bulyan(CatalogAdapter, FlowerBulyan):
    """Bulyan (El Mhamdi et al., 2018): Multi-Krum selection, then a coordinate-wise
    trimmed mean around the median; robust to `num_malicious_nodes` (0) Byzantine
    clients when there are at least 4 x that + 3 replies. Flower's implementation."""

    BYZANTINE_QUORUM = (4, 3)


CATALOG: dict[str, str] = {
    "fedavgm": "strategies.catalog:FedAvgM",
    "fedadam": "strategies.catalog:FedAdam",
    "fedyogi": "strategies.catalog:FedYogi",
    "fedadagrad": "strategies.catalog:FedAdagrad",
    "fedmedian": "strategies.catalog:FedMedian",
    "fedtrimmedavg": "strategies.catalog:FedTrimmedAvg",
    "krum": "strategies.catalog:Krum",
    "multikrum": "strategies.catalog:MultiKrum",
    "bulyan": "strategies.catalog:Bulyan",
}
