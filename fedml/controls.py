"""Convergence controls: how the server steers a run between rounds.

The round loop (`fedml.server`) asks `Controls` three things about each round:

- before training: the client learning rate (`client.lr` x `client.lr_decay`^(r-1) x the
  divergence guard's scale); with `strategy.adaptive_mu` it also steers FedProx's mu,
  which the strategy holds;
- after aggregation and evaluation: is the attempt acceptable? A round is retried (up to
  a limit) when too few updates could be aggregated (`participation.*`) or when the
  global loss diverged (`guard.*`: NaN/inf, or above `guard.factor` x the best loss;
  the guard then scales the client learning rate by `guard.lr_factor`);
- after an accepted round: stop or go on (`stop.*`: early stopping with patience and
  min_delta on any history metric, a target such as "server.accuracy >= 0.95", a
  wall-clock budget, the round limit).

The server optimiser (`server.lr`, `server.momentum`: FedAvgM, Hsu et al. 2019) turns the
aggregate into the next global model: w <- w + lr * v, v <- momentum * v + (aggregate - w).

Everything a later round depends on is in `state_dict()`, which the run store commits
with each round, so a resumed run steers exactly as an uninterrupted one. Wall-clock time
is not state: the budget counts the `seconds` of the committed history rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from fedml.arrays import from_numpy, record_of, to_numpy
from fedml.config import RunConfig
from fedml.contracts import Proximal, is_proximal
from fedml.monitor import LOSS_ORDER, STOP_ORDER, Monitor, Target
from fedml.privacy import STOP_PRIVACY
from fedml.records import HistoryRow

STOP_MAX_ROUNDS = "max rounds"
STOP_EARLY = "early stop"
STOP_TARGET = "target reached"
STOP_TIME = "time budget"
STOP_DIVERGED = "diverged"
STOP_TOO_FEW = "too few replies"

# Runs stopped for these reasons may go on when resumed with more rounds / more time.
EXTENSIBLE_STOPS = frozenset({STOP_MAX_ROUNDS, STOP_TIME})


class EarlyStopping:
    """Stops when the monitored metric has not improved by more than `min_delta` for
    `patience` accepted rounds; remembers the best round (restored at the end)."""

    def __init__(self, metric: str, mode: str, patience: int, min_delta: float) -> None:
        self.monitor = Monitor(metric, mode, auto=STOP_ORDER)
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_round: int | None = None
        self.waited = 0

    def update(self, row: HistoryRow) -> bool:
        """Record one accepted round; True when patience has run out."""
        value = self.monitor.value(row)
        if value is None:
            self.waited += 1
        else:
            name = self.monitor.name(row) or ""
            sign = 1.0 if self.monitor.maximise(name) else -1.0
            if self.best is None or sign * (value - self.best) > self.min_delta:
                self.best, self.best_round, self.waited = value, row["round"], 0
            else:
                self.waited += 1
        return self.waited >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_round": self.best_round, "waited": self.waited}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_round, self.waited = (
            state["best"],
            state["best_round"],
            state["waited"],
        )


class DivergenceGuard:
    """Judges the global loss after each round attempt.

    Divergence: the watched loss ("auto": server.loss, else evaluate.loss, else
    train.loss) is NaN/inf, or exceeds `factor` x the best loss of accepted rounds
    (`factor` 0: only NaN/inf). Each divergence multiplies the client learning-rate
    scale by `lr_factor`; the scale stays for the rest of the run.
    """

    def __init__(self, metric: str, factor: float, lr_factor: float) -> None:
        self.monitor = Monitor(metric, "min", auto=LOSS_ORDER)
        self.factor = factor
        self.lr_factor = lr_factor
        self.best_loss: float | None = None
        self.lr_scale = 1.0

    def problem(self, row: HistoryRow) -> str | None:
        """Why this attempt diverged, or None."""
        name = self.monitor.name(row)
        if name is None:
            return None
        loss = self.monitor.raw(row)
        if loss is None or not math.isfinite(loss):
            return f"{name} is {loss}"
        if self.factor > 0 and self.best_loss is not None and loss > self.factor * self.best_loss:
            return f"{name} {loss:.4g} > {self.factor:g} x best {self.best_loss:.4g}"
        return None

    def back_off(self) -> None:
        self.lr_scale *= self.lr_factor

    def accept(self, row: HistoryRow) -> None:
        loss = self.monitor.value(row)
        if loss is not None and (self.best_loss is None or loss < self.best_loss):
            self.best_loss = loss

    def state_dict(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss, "lr_scale": self.lr_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss, self.lr_scale = state["best_loss"], state["lr_scale"]


class AdaptiveMu:
    """FedProx's mu heuristic (Li et al. 2020, section 5.3.3): add `step` when the
    round's training loss rose, subtract `step` (not below 0) after `patience`
    consecutive decreases. It steers the strategy's own `proximal_mu` (the one owner of
    the value) and commits it with its own state."""

    def __init__(self, strategy: Proximal, step: float, patience: int) -> None:
        self.strategy = strategy
        self.step = step
        self.patience = patience
        self.last_loss: float | None = None
        self.decreases = 0

    @property
    def mu(self) -> float:
        return self.strategy.proximal_mu

    def update(self, train_loss: float | None) -> None:
        if train_loss is None or not math.isfinite(train_loss):
            return
        if self.last_loss is not None:
            if train_loss > self.last_loss:
                self.strategy.proximal_mu = self.mu + self.step
                self.decreases = 0
            else:
                self.decreases += 1
                if self.decreases >= self.patience:
                    self.strategy.proximal_mu = max(0.0, self.mu - self.step)
                    self.decreases = 0
        self.last_loss = train_loss

    def state_dict(self) -> dict[str, Any]:
        return {"mu": self.mu, "last_loss": self.last_loss, "decreases": self.decreases}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.proximal_mu = state["mu"]
        self.last_loss, self.decreases = state["last_loss"], state["decreases"]


class ServerOptimizer:
    """Server learning rate and momentum on the aggregated update (FedAvgM).

    Only floating-point arrays move by the update rule; integer buffers (BatchNorm's
    counters) take the aggregate as is. With lr 1 and momentum 0 the aggregate passes
    through untouched (plain FedAvg, bit for bit).
    """

    def __init__(self, lr: float, momentum: float) -> None:
        self.lr = lr
        self.momentum = momentum
        self.velocity: dict[str, np.ndarray] = {}

    @property
    def is_identity(self) -> bool:
        return self.lr == 1.0 and self.momentum == 0.0

    def step(
        self, current: ArrayRecord, aggregate: ArrayRecord
    ) -> tuple[ArrayRecord, dict[str, np.ndarray]]:
        """The next global arrays and the velocity that goes with them (kept only when
        the round is accepted: see `accept`)."""
        if self.is_identity:
            return aggregate, self.velocity
        new_arrays, velocity = {}, {}
        for key, array in aggregate.items():
            target = to_numpy(array)
            if target.dtype.kind != "f":
                new_arrays[key] = from_numpy(target)
                continue
            start = to_numpy(current[key]).astype(np.float64)
            delta = target.astype(np.float64) - start
            v = self.momentum * self.velocity[key] + delta if key in self.velocity else delta
            velocity[key] = v
            moved = (start + self.lr * v).astype(target.dtype)
            new_arrays[key] = from_numpy(np.require(moved, requirements="C"))
        return record_of(new_arrays), velocity

    def accept(self, velocity: dict[str, np.ndarray]) -> None:
        self.velocity = velocity

    def state_dict(self) -> dict[str, Any]:
        return {"velocity": dict(self.velocity)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.velocity = {k: np.asarray(v) for k, v in state["velocity"].items()}


@dataclass(frozen=True)
class Verdict:
    """What happens to a round attempt that cannot be accepted: retry it, skip it (keep
    the old global model and go on), or stop the run (`stop` names the reason)."""

    action: str  # "retry" | "skip" | "stop"
    reason: str | None = None
    stop: str | None = None


class Controls:
    """All of a run's convergence controls, configured from `RunConfig` (see the module
    docstring); one stateful component of the round loop."""

    def __init__(self, cfg: RunConfig, strategy: Strategy) -> None:
        self.cfg = cfg
        stop, guard = cfg.stop, cfg.guard
        self.early = (
            EarlyStopping(stop.metric, stop.mode, stop.patience, stop.min_delta)
            if stop.metric
            else None
        )
        self.target = Target.parse(stop.target) if stop.target else None
        self.guard = DivergenceGuard(guard.metric, guard.factor, guard.lr_factor)
        self.mu: AdaptiveMu | None = None
        if cfg.strategy.adaptive_mu:
            assert is_proximal(strategy), "validate() allows adaptive_mu with FedProx only"
            self.mu = AdaptiveMu(strategy, cfg.strategy.mu_step, cfg.strategy.mu_patience)
        self.optimizer = ServerOptimizer(cfg.server.lr, cfg.server.momentum)
        self.attempts = 0  # failed attempts of the round in progress

    # -- before a round ------------------------------------------------------------------
    def client_lr(self, server_round: int) -> float:
        c = self.cfg.client
        return c.lr * c.lr_decay ** (server_round - 1) * self.guard.lr_scale

    # -- after an attempt ----------------------------------------------------------------
    def judge_participation(
        self, aggregated: int, replies: int, non_finite: int, declined: int = 0
    ) -> Verdict | None:
        """None when enough updates were aggregated; else what to do. When most replies
        were non-finite the clients diverged, which is the guard's business; when clients
        declined because their privacy budget is spent, the run is over."""
        needed = self.cfg.participation.min_replies
        if aggregated >= needed:
            return None
        if declined:
            return Verdict(
                "stop",
                f"{aggregated} update(s) aggregated, {needed} needed; {declined} client(s) "
                "declined: privacy budget spent",
                STOP_PRIVACY,
            )
        if non_finite and 2 * non_finite >= replies:
            return self._diverged(f"{non_finite} of {replies} updates were non-finite")
        reason = f"{aggregated} update(s) aggregated, {needed} needed"
        policy = self.cfg.participation.on_too_few
        if policy == "stop":
            return Verdict("stop", reason, STOP_TOO_FEW)
        if policy == "skip":
            return Verdict("skip", reason)
        return self._retry(reason, self.cfg.participation.max_retries, STOP_TOO_FEW)

    def judge_loss(self, row: HistoryRow) -> Verdict | None:
        problem = self.guard.problem(row)
        return None if problem is None else self._diverged(problem)

    def _diverged(self, reason: str) -> Verdict:
        verdict = self._retry(reason, self.cfg.guard.max_retries, STOP_DIVERGED)
        if verdict.action == "retry":
            self.guard.back_off()
        return verdict

    def _retry(self, reason: str, limit: int, stop: str) -> Verdict:
        if self.attempts >= limit:
            return Verdict("stop", reason, stop)
        self.attempts += 1
        return Verdict("retry", reason)

    # -- after an accepted round ---------------------------------------------------------
    def accept(self, row: HistoryRow, velocity: dict[str, np.ndarray]) -> None:
        """Fold an accepted round into the controls' state."""
        self.guard.accept(row)
        self.optimizer.accept(velocity)
        if self.mu:
            self.mu.update((row.get("train") or {}).get("loss"))

    def end_of_round(self, row: HistoryRow, elapsed: float) -> str | None:
        """The stop reason after this round, or None to go on. `elapsed`: seconds spent
        in rounds so far, over every process that worked on the run."""
        self.attempts = 0
        early = self.early.update(row) if self.early else False
        if self.target and self.target.reached(row):
            return STOP_TARGET
        if early:
            return STOP_EARLY
        budget = self.cfg.stop.max_seconds
        if budget > 0 and elapsed >= budget:
            return STOP_TIME
        if row["round"] >= self.cfg.rounds:
            return STOP_MAX_ROUNDS
        return None

    @property
    def best_round(self) -> int | None:
        """The early-stopping metric's best round (kept by the run store), if any."""
        return self.early.best_round if self.early else None

    def model_round(self) -> int | None:
        """The round whose model the run delivers at its end: the best one when early
        stopping is on and `stop.restore_best`; None for the last round."""
        return self.best_round if self.cfg.stop.restore_best else None

    # -- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "guard": self.guard.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        if self.early:
            state["early"] = self.early.state_dict()
        if self.mu:
            state["mu"] = self.mu.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.guard.load_state_dict(state["guard"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.early:
            self.early.load_state_dict(state["early"])
        if self.mu:
            self.mu.load_state_dict(state["mu"])
