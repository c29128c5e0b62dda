"""Client-level (user-level) DP: Flower's server-side clipping wrappers, accounted.

`dp.mode = "user-fixed"` wraps the strategy in Flower's
`DifferentialPrivacyServerSideFixedClipping`, `"user-adaptive"` in
`DifferentialPrivacyServerSideAdaptiveClipping` (Andrew et al., 2021): each client's
update is clipped to an L2 norm (fixed `dp.clip_norm`, or adapted towards the median
norm), the clipped updates are averaged with equal weights, and Gaussian noise of
std = noise_multiplier x clip_norm / sampled clients is added to the average.

What Flower leaves to us, and this module adds:

- accounting: each released aggregate is one Gaussian mechanism on the client-level
  sensitivity. It is accounted by Opacus without sampling amplification (a valid bound
  for any client sampling), and when fewer clients reply than were sampled the noise is
  relatively smaller, so that release is accounted at noise x replied / sampled;
- equal weights: the inner FedAvg averages updates uniformly (the noise is calibrated
  to clip_norm / clients; example-weighted averaging would break that bound);
- state: the wrappers keep the adaptive clip norm and draw noise from numpy's global
  RNG; `state_dict()` carries both (the RNG only in reproducible simulation), so a
  resumed run continues exactly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedml.config import RunConfig
from fedml.errors import FedmlError
from fedml.privacy import budget, epsilon_of, planned_delta, planned_noise, with_steps
from strategies.fedavg import FedAvg

NO_AMPLIFICATION = 1.0  # the sample rate at which every release is accounted


class UserLevelAccounting:
    """Mixin for Flower's server-side DP wrappers: accountant history of the released
    aggregates, the history row's "privacy" entry, the budget, and committed state."""

    planned_noise: float
    dp_accountant: str
    dp_delta: float
    dp_budget: float
    reproducible: bool
    dp_history: list[tuple[float, float, int]]

    def _setup(self, cfg: RunConfig, noise: float, delta: float, reproducible: bool) -> None:
        self.planned_noise = noise
        self.dp_accountant = cfg.dp.accountant
        self.dp_delta = delta
        self.dp_budget = budget(cfg.dp)
        self.reproducible = reproducible
        self.dp_history = []
        if reproducible:
            np.random.seed(cfg.seed + 3)  # Flower's wrappers draw noise from numpy's RNG

    def aggregate_train(
        self, server_round: int, replies: Any
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        answered = sum(1 for reply in replies if not reply.has_error())
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is not None:
            self._account(answered)
        return arrays, metrics

    def release_secure_mean(self, mean: ArrayRecord, answered: int) -> ArrayRecord:
        """Under secure aggregation: the unmasked mean of the `answered` sites' updates,
        each clipped at its site to the clip norm (Flower's client-side fixed clipping),
        released as this wrapper releases its own average: the same Gaussian noise
        (std = noise_multiplier x clip_norm / sampled clients), the same accounting."""
        noised = self._add_noise_to_aggregated_arrays(mean)  # type: ignore[attr-defined]
        self._account(answered)
        return noised

    def _account(self, answered: int) -> None:
        """One release, its noise relatively smaller when fewer sites answered."""
        sampled = self.num_sampled_clients  # type: ignore[attr-defined]
        noise = self.planned_noise * min(1.0, answered / sampled)
        self.dp_history = with_steps(self.dp_history, noise, NO_AMPLIFICATION, 1)

    # The round loop asks the strategy these (fedml.contracts); they belong to the inner one.
    @property
    def keeps_partial_work(self) -> bool:
        return getattr(self.strategy, "keeps_partial_work", False)  # type: ignore[attr-defined]

    @property
    def proximal_mu(self) -> float:
        """FedProx's mu (AttributeError when the inner strategy has none, so
        `fedml.contracts.is_proximal` answers as it would for the bare strategy)."""
        return self.strategy.proximal_mu  # type: ignore[attr-defined]

    @proximal_mu.setter
    def proximal_mu(self, value: float) -> None:
        self.strategy.proximal_mu = value  # type: ignore[attr-defined]

    def epsilon(self) -> float:
        return epsilon_of(tuple(self.dp_history), self.dp_accountant, self.dp_delta)

    def next_release_exceeds(self) -> bool:
        """Would one more full release take epsilon past the budget?"""
        if self.dp_budget == math.inf:
            return False
        nxt = with_steps(self.dp_history, self.planned_noise, NO_AMPLIFICATION, 1)
        return epsilon_of(tuple(nxt), self.dp_accountant, self.dp_delta) > self.dp_budget

    def privacy_row(self) -> dict[str, Any]:
        return {
            "level": "user",
            "epsilon": self.epsilon(),
            "delta": self.dp_delta,
            "noise_multiplier": self.planned_noise,
            "clip_norm": float(self.clipping_norm),  # type: ignore[attr-defined]
            "releases": sum(steps for _, _, steps in self.dp_history),
        }

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "inner": self.strategy.state_dict(),  # type: ignore[attr-defined]
            "history": [list(entry) for entry in self.dp_history],
            "clip_norm": float(self.clipping_norm),  # type: ignore[attr-defined]
        }
        if self.reproducible:
            kind, keys, pos, has_gauss, cached = np.random.get_state()
            state["numpy_rng"] = [kind, keys, int(pos), int(has_gauss), float(cached)]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state["inner"])  # type: ignore[attr-defined]
        self.dp_history = [(float(n), float(q), int(s)) for n, q, s in state["history"]]
        self.clipping_norm = float(state["clip_norm"])
        if self.reproducible and "numpy_rng" in state:
            kind, keys, pos, has_gauss, cached = state["numpy_rng"]
            np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


class UserDPFixed(UserLevelAccounting, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP wrapper, accounted and resumable."""


class UserDPAdaptive(UserLevelAccounting, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive-clipping DP wrapper, accounted and resumable."""


def wrap_user_dp(inner: Strategy, cfg: RunConfig, reproducible: bool) -> UserLevelAccounting:
    """`inner` inside the user-level DP wrapper that `cfg.dp.mode` names."""
    dp, s = cfg.dp, cfg.strategy
    sampled = max(int(cfg.simulation.clients * s.fraction_train), s.min_train_clients)
    delta = planned_delta(dp, cfg.simulation.clients)
    noise = planned_noise(dp, delta, NO_AMPLIFICATION, cfg.rounds)
    if not isinstance(inner, FedAvg):
        raise FedmlError(
            f"dp.mode '{dp.mode}' needs a strategy built on fedml's FedAvg (it averages "
            f"clipped updates with equal weights); '{cfg.strategy.name}' is not one."
        )
    inner.uniform_weights = True
    try:
        if dp.mode == "user-fixed":
            wrapper: UserLevelAccounting = UserDPFixed(inner, noise, dp.clip_norm, sampled)
        else:
            # the clipped-count noise: Flower's default (sampled / 20, after Andrew et al.)
            # unless the model's noise needs more (Flower requires noise < 2x this)
            count_noise = max(sampled / 20, noise)
            wrapper = UserDPAdaptive(
                inner,
                noise,
                sampled,
                initial_clipping_norm=dp.clip_norm,
                clipped_count_stddev=count_noise,
            )
    except ValueError as exc:
        raise FedmlError(
            f"dp.mode '{dp.mode}' with noise multiplier {noise:.4g} and {sampled} sampled "
            f"clients: {exc}"
        ) from exc
    wrapper._setup(cfg, noise, delta, reproducible)
    return wrapper
