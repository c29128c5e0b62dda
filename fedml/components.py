"""The round loop's stateful parts, as one typed record.

Everything that decides later rounds is one of these fields and is committed with every
round under the field's name (the run store's `state.json`): the strategy (sampling RNG,
optimiser moments), the scenario RNGs, the convergence controls, the privacy report, the
screening memory, the hostile sites and the run's standardisation. A resumed run gets
each part's committed state back, so it plays the rounds an uninterrupted run would have
played. A new stateful part is a new field.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedml.config import RunConfig
from fedml.contracts import is_stateful
from fedml.controls import Controls
from fedml.preprocessing import FeatureScaling
from fedml.privacy import PrivacyReport
from fedml.secure_round import Exclusions
from fedml.validation import ScreeningMemory
from simulations.scenarios import Dropout, Stragglers

log = logging.getLogger(__name__)


@dataclass
class RoundComponents:
    """The parts of one run's round loop, in commit order. The strategy comes first:
    on resume it gets its own state back before the controls' `AdaptiveMu` sets its
    `proximal_mu` (the strategy's state does not hold mu; the controls' does)."""

    strategy: Strategy
    stragglers: Stragglers
    dropout: Dropout
    controls: Controls
    privacy: PrivacyReport
    screening: ScreeningMemory
    hostile: Exclusions  # sites proven to break secure aggregation: left out
    scaling: FeatureScaling  # the federated standardisation, gathered before round 1

    @classmethod
    def for_run(
        cls, cfg: RunConfig, strategy: Strategy, scaling: FeatureScaling | None = None
    ) -> RoundComponents:
        """Fresh parts for a run of `cfg` (their seeds derive from the run seed);
        `scaling`: the run's standardisation (None: the run has none)."""
        user_dp = cfg.dp.mode.startswith("user")
        return cls(
            strategy=strategy,
            stragglers=Stragglers(cfg.simulation.stragglers, seed=cfg.seed + 1),
            dropout=Dropout(cfg.simulation.dropout, seed=cfg.seed + 2),
            controls=Controls(cfg, strategy),
            privacy=PrivacyReport(cfg.dp.mode, strategy if user_dp else None),
            screening=ScreeningMemory(),
            hostile=Exclusions(),
            scaling=scaling or FeatureScaling(enabled=False, num_features=0, min_sites=0),
        )

    def _named(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def capture(self) -> dict[str, Any]:
        """`state_dict()` of every part that has state (the `Stateful` protocol)."""
        return {
            name: part.state_dict() for name, part in self._named().items() if is_stateful(part)
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Give each part its committed state; say so when one cannot take it (a plugin
        strategy without `state_dict()`/`load_state_dict()` restarts its own state)."""
        for name, part in self._named().items():
            if is_stateful(part) and name in state:
                part.load_state_dict(state[name])
            elif is_stateful(part):
                continue  # a part newer than the commit: it starts as in a fresh run
            else:
                log.warning(
                    "%s %s has no committed state (no state_dict()/load_state_dict()); "
                    "its internal state restarts on resume",
                    name,
                    type(part).__name__,
                )
