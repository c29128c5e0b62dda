"""The run's federated preprocessing: one exchange before round 1 that gathers every
site's feature statistics, and the standardisation they give (`fedml.data.features`).

`FeatureScaling` is one of the round loop's stateful parts (`RoundComponents.scaling`):
its statistics are committed with every round, so a resumed run standardises exactly as
before and never asks the sites again. Before the first round it sends every connected
node a Flower query message (`query.feature_stats`, answered by the ClientApp's
`feature_stats` handler), screens each reply (`FeatureStats.from_metrics`), adds up the
valid ones and keeps the resulting `Standardization`, which then rides in every train
and evaluate message's config. A site that fails or sends broken statistics is left
out of them and named in the log; with no valid statistics at all the run stops before
training, with the sites' reasons.

Which runs standardise (`data.preprocess`): "standardize" always (tabular data only),
"none" never, "auto" (the default) when the examples are rows of numbers from a table:
`breast-cancer`, `fed-heart-disease`, `csv:` and `npz:` data, and every deployed run whose
server test set is tabular. Images and the FedProx paper's `synthetic` generator (whose
features the paper uses as drawn) keep their values.

Under secure aggregation the statistics are gathered like a secure round's updates
(`fedml.secure_round`): the query is the third of the four exchanges, each site answers
with its statistics in fixed point (`fedml.secagg.fixed_point`, units the server chose
from its test set's spread) under its masks, and the server unmasks only their sum. It
then sees no site's statistics, so it cannot screen or cap a single site's (it checks
the sum), and at least the secure threshold of sites must answer.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedml.config import RunConfig
from fedml.data.datasets import Federation
from fedml.data.features import (
    SECURE_LIMIT_KEY,
    SECURE_UNITS_KEY,
    SHIFT_KEY,
    STATS_ACTION,
    FeatureStats,
    Standardization,
    check_observed,
    secure_units,
    unscaled_features,
)
from fedml.errors import FedmlError
from fedml.failures import failure_reason
from fedml.secagg import fixed_point
from fedml.secure_round import Exclusions, SecureRound
from fedml.validation import Tally
from strategies.sampling import NODE_WAIT_SECONDS

log = logging.getLogger(__name__)

STATS_MESSAGE_TYPE = f"{MessageType.QUERY}.{STATS_ACTION}"


def wants_standardization(cfg: RunConfig, federation: Federation) -> bool:
    """Whether this run standardises its features (see the module doc); a `FedmlError`
    when `data.preprocess = "standardize"` asks for what the run cannot do."""
    mode = cfg.data.preprocess
    tabular = len(federation.input_shape) == 1
    if mode == "none":
        return False
    if mode == "standardize":
        if not tabular:
            raise FedmlError(
                f"data.preprocess = 'standardize' needs tabular examples (one row of "
                f"numbers each); {cfg.data.dataset}'s have shape {federation.input_shape}. "
                "Set data.preprocess to 'auto' or 'none'."
            )
        return True
    return tabular and not cfg.data.dataset.startswith("synthetic")


def warn_if_unscaled(federation: Federation) -> None:
    """Say so when a run without standardisation meets tabular features far from
    standardised (on the server's test set): they train poorly, often to the majority
    class, without any error."""
    if federation.test is None or len(federation.input_shape) != 1:
        return
    wide = unscaled_features(federation.test.x)
    if wide:
        index, mean, std = max(wide, key=lambda f: max(abs(f[1]), f[2]))
        names = federation.feature_names
        name = names[index] if index < len(names) else f"#{index}"
        log.warning(
            "%d of %d features look unscaled (feature %s: mean %.3g, std %.3g) and the run "
            "does not standardise them; set data.preprocess = 'standardize' (or 'auto') "
            "to standardise them with statistics computed across the sites",
            len(wide), federation.input_shape[0], name, mean, std,
        )  # fmt: skip


def _capped_total(stats: list[FeatureStats], max_weight_factor: float) -> FeatureStats:
    """The sum of the sites' statistics, each site's weight (its rows) capped at
    `max_weight_factor` times the median of the other sites' rows, as training claims
    are capped: a site claiming 10^12 rows cannot set the federation's means alone."""
    rows = [s.rows for s in stats]
    total: FeatureStats | None = None
    for index, site in enumerate(stats):
        others = rows[:index] + rows[index + 1 :]
        if max_weight_factor > 0 and others:
            cap = max_weight_factor * float(np.median(others))
            if site.rows > cap:
                log.warning("a site's %d rows count as %d (capped)", site.rows, int(cap))
                site = site.scaled(cap / site.rows)
        total = site if total is None else total + site
    assert total is not None
    return total


class FeatureScaling:
    """The run's standardisation, gathered once from the sites (see the module doc)."""

    def __init__(
        self,
        enabled: bool,
        num_features: int,
        min_sites: int,
        shift: np.ndarray | None = None,
        max_weight_factor: float = 0.0,
        feature_names: tuple[str, ...] = (),
        secagg_cfg: RunConfig | None = None,
        spread: np.ndarray | None = None,
    ) -> None:
        self.enabled = enabled
        self.num_features = num_features
        self.min_sites = min_sites
        # the sums are taken around this (the server's test-set means; None: 0)
        self.shift = shift
        self.max_weight_factor = max_weight_factor  # caps a site's rows (0: no cap)
        self.feature_names = feature_names
        # under secure aggregation: the run (its secagg settings), and each feature's
        # spread on the server's test set (the fixed-point units; None: 1)
        self.secagg_cfg = secagg_cfg
        self.spread = spread if spread is not None else np.ones(num_features)
        self.standardization: Standardization | None = None
        self.sites = 0  # how many sites' statistics it combines
        self.rows = 0  # over how many training rows
        self.node_wait = NODE_WAIT_SECONDS

    @property
    def pending(self) -> bool:
        """Whether the statistics still have to be gathered."""
        return self.enabled and self.standardization is None

    def config(self) -> dict[str, list[float]]:
        """What every train and evaluate message's config carries (empty: nothing)."""
        return self.standardization.to_config() if self.standardization is not None else {}

    def gather(self, grid: Grid, timeout: float | None, hostile: Exclusions | None = None) -> None:
        """Ask every connected node for its statistics and combine them: the valid
        replies, each site's weight capped like a training claim (at `max_weight_factor`
        times the median of the other sites' rows), or under secure aggregation the
        unmasked sum. Fewer than `min_sites` sites stop the run before training:
        statistics are committed for good."""
        nodes = self._nodes(grid)
        if self.secagg_cfg is not None:
            excluded = hostile if hostile is not None else Exclusions()
            total, sites, refused = self._secure_total(
                self.secagg_cfg, grid, nodes, timeout, excluded
            )
        else:
            total, sites, refused = self._plain_total(grid, nodes, timeout)
        for why in refused:
            log.warning("feature statistics left out: %s", why)
        if total is None or sites < max(1, self.min_sites):
            raise FedmlError(
                f"{sites} site(s) sent usable feature statistics ({len(nodes)} asked"
                + (f"; {'; '.join(refused[:3])}" if refused else "")
                + f"), fewer than the {self.min_sites} the run needs "
                "(strategy.min_train_clients), so the features cannot be standardised for "
                "the whole federation. Start the sites first, fix them, or set "
                "data.preprocess = 'none'."
            )
        check_observed(total, list(self.feature_names) or None)
        self.sites = sites
        self.rows = total.rows
        self.standardization = Standardization.from_stats(total, self._shift())
        log.info(
            "features standardised with statistics of %d training rows from %d site(s)%s",
            self.rows, self.sites, " (only their masked sum seen)" if self.secagg_cfg else "",
        )  # fmt: skip

    def _query(self, nodes: list[int], extra: dict[str, Any]) -> list[Message]:
        config = ConfigRecord({SHIFT_KEY: [float(v) for v in self._shift()], **extra})
        return [
            Message(RecordDict({"config": config}), node, STATS_MESSAGE_TYPE, group_id="stats")
            for node in nodes
        ]

    def _plain_total(
        self, grid: Grid, nodes: list[int], timeout: float | None
    ) -> tuple[FeatureStats | None, int, list[str]]:
        """Every site's statistics in the clear, screened and capped; their total."""
        found: dict[int, FeatureStats] = {}
        refused: list[str] = []
        answered: set[int] = set()
        for reply in grid.send_and_receive(self._query(nodes, {}), timeout=timeout):
            source = reply.metadata.src_node_id
            answered.add(source)
            if reply.has_error():
                refused.append(f"node {source}: {failure_reason(reply.error)}")
                continue
            try:
                metrics = next(iter(reply.content.metric_records.values()), None)
                if metrics is None:
                    raise ValueError("the reply holds no metrics")
                found[source] = FeatureStats.from_metrics(dict(metrics), self.num_features)
            except ValueError as exc:
                refused.append(f"node {source}: {exc}")
        refused += [f"node {node}: no reply" for node in sorted(set(nodes) - answered)]
        if not found:
            return None, 0, refused
        # summed in node order: the same sites give the same bits, whatever order they answer in
        total = _capped_total([found[node] for node in sorted(found)], self.max_weight_factor)
        return total, len(found), refused

    def _secure_total(
        self,
        cfg: RunConfig,
        grid: Grid,
        nodes: list[int],
        timeout: float | None,
        hostile: Exclusions,
    ) -> tuple[FeatureStats | None, int, list[str]]:
        """The sites' statistics summed under secure aggregation: the server unmasks
        only the total (no site's statistics, so none is screened or capped alone). A
        site proven hostile is left out (`hostile`, the run's exclusions) and the
        exchange played once more without it."""
        units = [float(u) for u in secure_units(self.spread)]
        limit = fixed_point.site_limit(len(nodes))
        extra = {SECURE_UNITS_KEY: units, SECURE_LIMIT_KEY: limit}
        binding = fixed_point.binding(units, limit, [float(v) for v in self._shift()])
        refused: list[str] = []
        for attempt in range(2):  # once more without a site proven to break the protocol
            secure = SecureRound(cfg, server_round=0, attempt=attempt, grid=grid, timeout=timeout)
            tally = Tally()
            summed = secure.masked_total(
                self._query(nodes, extra), len(units), tally, hostile=hostile, binding=binding
            )
            refused = [f"{count} site(s): {why}" for why, count in tally.failed_reasons.items()]
            refused += [f"{count} site(s): {why}" for why, count in tally.rejected.items()]
            if summed is not None or "hostile" not in secure.row:
                break
        if summed is None:
            return None, 0, [*refused, "secure aggregation could not unmask the sum"]
        try:
            total = FeatureStats.from_sum(fixed_point.decode(summed, units), self.num_features)
        except ValueError as exc:
            return None, 0, [*refused, f"the unmasked sum: {exc}"]
        return total, len(secure.survivors), refused

    def _shift(self) -> np.ndarray:
        return self.shift if self.shift is not None else np.zeros(self.num_features)

    def _nodes(self, grid: Grid) -> list[int]:
        """The connected nodes, once `min_sites` are (waiting at most `node_wait` s)."""
        deadline = time.monotonic() + self.node_wait
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < self.min_sites and time.monotonic() < deadline:
            time.sleep(1)
            nodes = sorted(grid.get_node_ids())
        return nodes

    def row(self) -> dict[str, Any]:
        """The history row's account of it (the first round's row)."""
        row = {"standardized": self.num_features, "sites": self.sites, "rows": self.rows}
        return {**row, "masked": True} if self.secagg_cfg is not None else row

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        if self.standardization is None:
            return {}
        return {
            "mean": self.standardization.mean,
            "scale": self.standardization.scale,
            "sites": self.sites,
            "rows": self.rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.standardization = Standardization(
            np.asarray(state["mean"], dtype=np.float64),
            np.asarray(state["scale"], dtype=np.float64),
        )
        self.sites, self.rows = int(state["sites"]), int(state["rows"])
