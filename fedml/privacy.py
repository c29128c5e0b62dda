"""Privacy accounting shared by clients and server, and the server's privacy report.

Accounting is Opacus's: an accountant history is a list of (noise multiplier, sample
rate, steps) entries, and epsilon comes from `opacus.accountants` ("rdp" or "prv") for
that history at a given delta. Opacus is imported only when an epsilon is computed.

The server learns what clients spent from their replies: with `dp.mode = "sample"` each
training reply's metrics carry "dp-epsilon" and "dp-delta", and a client whose budget is
spent answers with an error of code `DECLINED_CODE` instead of an update. `PrivacyReport`
turns that into each history row's "privacy" entry and into the "privacy budget" stop.
With `dp.mode = "user-*"` the strategy wrapper (strategies/user_dp.py) keeps the
accountant of the released aggregates and the report asks it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from flwr.app import Message

from fedml.errors import FedmlError
from fedml.failures import DECLINED_CODE
from fedml.validation import finite_number

if TYPE_CHECKING:  # for a type hint only
    from fedml.config import DPConfig

EPSILON_KEY = "dp-epsilon"
DELTA_KEY = "dp-delta"
PRIVACY_KEYS = (EPSILON_KEY, DELTA_KEY)
STOP_PRIVACY = "privacy budget"

# (noise multiplier, sample rate, steps): one entry of an Opacus accountant's history.
HistoryEntry = tuple[float, float, int]


def default_delta(population: int) -> float:
    """1 / (10 n) rounded down to a power of ten: well below 1/n, as DP needs.
    (10^-k for the smallest k with 10^k >= 10 n, in exact integer arithmetic.)"""
    return 10.0 ** -len(str(10 * max(population, 1) - 1))


def planned_delta(dp: DPConfig, population: int) -> float:
    """`dp.delta`, or 0 there: `default_delta` of the population the guarantee is about
    (a client's examples at example level; the clients at client level)."""
    return dp.delta or default_delta(population)


def planned_noise(dp: DPConfig, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier of a plan of `steps` noisy steps at `sample_rate`:
    `dp.noise_multiplier`, or with `dp.target_epsilon` the noise that spends that
    epsilon at `delta` (`noise_for_target`)."""
    if dp.target_epsilon > 0:
        return noise_for_target(dp.target_epsilon, delta, sample_rate, steps, dp.accountant)
    return dp.noise_multiplier


def budget(dp: DPConfig) -> float:
    """The epsilon that may not be exceeded: `dp.max_epsilon`, else the target, else
    none (a client's budget at example level, the run's at client level)."""
    return dp.max_epsilon or dp.target_epsilon or math.inf


def with_steps(
    history: Iterable[HistoryEntry], noise: float, sample_rate: float, steps: int
) -> list[HistoryEntry]:
    """`history` after `steps` accountant steps at (noise, sample_rate): the last entry
    grows when it has the same parameters, exactly as `opacus.accountants.*.step` does
    one step at a time (the PRV accountant's result depends on that grouping)."""
    history = list(history)
    if steps <= 0:
        return history
    if history and history[-1][:2] == (noise, sample_rate):
        last = history[-1]
        return [*history[:-1], (last[0], last[1], last[2] + steps)]
    return [*history, (noise, sample_rate, steps)]


@lru_cache(maxsize=1024)
def epsilon_of(history: tuple[HistoryEntry, ...], accountant: str, delta: float) -> float:
    """Epsilon of an accountant history at `delta`, by Opacus (0 when nothing was spent)."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant

    account = create_accountant(mechanism=accountant)
    account.history = list(history)
    with warnings.catch_warnings():
        # Opacus's RDP accountant warns when the best order is at the edge of its default
        # range; the bound is still valid (looser), and a user cannot act on the warning
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest)")
        return float(account.get_epsilon(delta=delta))


@lru_cache(maxsize=256)
def noise_for_target(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The noise multiplier that spends at most `target_epsilon` in `steps` steps
    (Opacus's binary search; it lands at or just below the target)."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )
    except ValueError as exc:
        raise FedmlError(
            f"dp.target_epsilon {target_epsilon} cannot be reached at delta {delta:g} in "
            f"{steps} noisy steps ({exc}). Raise the target or plan fewer rounds or epochs."
        ) from exc


class PrivacyReport:
    """What the clients report about their privacy spending, as the rounds stream by.

    Keeps each node's latest epsilon (and delta) and the nodes that declined because
    their budget is spent; both are committed with every round, so a resumed run reports
    the same figures. `source` is the user-level DP strategy when there is one.
    """

    def __init__(self, mode: str, source: Any = None) -> None:
        self.mode = mode
        self.source = source
        self.epsilon: dict[int, float] = {}
        self.delta: dict[int, float] = {}
        self.exhausted: set[int] = set()
        self.declined = 0  # in the current attempt

    def observe(self, replies: Iterable[Message]) -> Iterator[Message]:
        """Pass `replies` through, noting each one's epsilon or its refusal."""
        self.declined = 0
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                if reply.error.code == DECLINED_CODE:
                    self.declined += 1
                    self.exhausted.add(node)
            elif reply.content.metric_records:
                metrics = next(iter(reply.content.metric_records.values()))
                epsilon, delta = metrics.get(EPSILON_KEY), metrics.get(DELTA_KEY)
                if finite_number(epsilon) and finite_number(delta):
                    self.epsilon[node], self.delta[node] = float(epsilon), float(delta)
            yield reply

    def row(self) -> dict[str, Any] | None:
        """The history row's "privacy" entry (None when DP is off)."""
        if self.mode == "sample":
            if not self.epsilon:
                return None
            values = [self.epsilon[node] for node in sorted(self.epsilon)]
            return {
                "level": "sample",
                "epsilon_max": max(values),
                "epsilon_mean": math.fsum(values) / len(values),
                "delta": max(self.delta.values()),
                "clients": len(values),
                "exhausted": len(self.exhausted),
            }
        if self.source is not None:
            return self.source.privacy_row()
        return None

    def budget_stop(self, num_nodes: int, min_replies: int) -> str | None:
        """ "privacy budget" when fewer than `min_replies` nodes can still train, or when
        the user-level accountant's next release would exceed the budget."""
        if self.mode == "sample" and num_nodes - len(self.exhausted) < min_replies:
            return STOP_PRIVACY
        if self.source is not None and self.source.next_release_exceeds():
            return STOP_PRIVACY
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "epsilon": {str(n): e for n, e in sorted(self.epsilon.items())},
            "delta": {str(n): d for n, d in sorted(self.delta.items())},
            "exhausted": sorted(self.exhausted),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epsilon = {int(n): float(e) for n, e in state["epsilon"].items()}
        self.delta = {int(n): float(d) for n, d in state["delta"].items()}
        self.exhausted = {int(n) for n in state["exhausted"]}


def describe_privacy(privacy: dict[str, Any], with_delta: bool = True) -> str:
    """A history row's "privacy" entry in words, for the terminal."""
    if privacy["level"] == "user":
        text = f"client-level epsilon {privacy['epsilon']:.3g}"
    else:
        text = f"epsilon max {privacy['epsilon_max']:.3g} mean {privacy['epsilon_mean']:.3g}"
    return f"{text} (delta {privacy['delta']:g})" if with_delta else text


def without_privacy_keys(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """Aggregated train metrics minus the per-client privacy keys (an average of
    epsilons means nothing; the "privacy" entry reports them properly)."""
    if metrics is None:
        return None
    return {k: v for k, v in metrics.items() if k not in PRIVACY_KEYS}
