"""Convergence controls on scripted metric sequences: each decision is asserted."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from hypothesis import given
from hypothesis import strategies as st

from fedml.config import load_config
from fedml.controls import (
    AdaptiveMu,
    Controls,
    EarlyStopping,
    ServerOptimizer,
    Target,
)
from fedml.errors import FedmlError
from fedml.statefile import decode_state, encode_state
from strategies import build_strategy
from strategies.fedprox import FedProx


def _row(server_round: int, **groups: dict) -> dict:
    return {"round": server_round, **groups}


def _controls(**overrides) -> Controls:
    cfg = load_config(None, {"rounds": 50, **overrides})
    return Controls(cfg, build_strategy(cfg))


# ------------------------------------------------------------------------ early stopping
def test_early_stopping_stops_after_patience_rounds_without_a_min_delta_gain():
    early = EarlyStopping("server.accuracy", "auto", patience=3, min_delta=0.01)
    accuracies = [0.50, 0.60, 0.65, 0.64, 0.655, 0.649]
    stops = [
        early.update(_row(r, server={"accuracy": a})) for r, a in enumerate(accuracies, start=1)
    ]
    # round 3 is the last gain above 0.01 (0.655 - 0.65 is not); patience runs out at 6
    assert stops == [False, False, False, False, False, True]
    assert (early.best, early.best_round) == (0.65, 3)


def test_early_stopping_on_a_loss_minimises():
    early = EarlyStopping("evaluate.loss", "auto", patience=2, min_delta=0.0)
    losses = [1.0, 0.8, 0.9, 0.7, 0.75, 0.71]
    stops = [early.update(_row(r, evaluate={"loss": v})) for r, v in enumerate(losses, start=1)]
    assert stops == [False, False, False, False, False, True]
    assert early.best_round == 4


def test_a_round_without_the_metric_counts_as_no_improvement():
    early = EarlyStopping("server.accuracy", "max", patience=2, min_delta=0.0)
    assert not early.update(_row(1, server={"accuracy": 0.5}))
    assert not early.update(_row(2, server=None))
    assert early.update(_row(3, server={"accuracy": float("nan")}))


# ------------------------------------------------------------------------------- target
@pytest.mark.parametrize(
    ("text", "value", "reached"),
    [
        ("server.accuracy >= 0.95", 0.95, True),
        ("server.accuracy >= 0.95", 0.9499, False),
        ("server.accuracy > 0.95", 0.95, False),
        ("evaluate.loss<0.2", 0.19, True),
        ("evaluate.loss <= 0.2", 0.21, False),
    ],
)
def test_target_conditions(text, value, reached):
    target = Target.parse(text)
    group, _, metric = target.metric.partition(".")
    assert target.reached(_row(1, **{group: {metric: value}})) is reached
    assert not target.reached(_row(1))  # an absent metric never reaches a target


@pytest.mark.parametrize(
    ("text", "mean", "median", "reached"),
    [
        ("evaluate.accuracy >= 0.8", 0.811, 0.30, False),  # two liars lift the mean only
        ("evaluate.accuracy >= 0.8", 0.85, 0.82, True),
        ("evaluate.loss <= 0.2", 0.05, 0.9, False),
        ("evaluate.loss <= 0.2", 0.15, 0.19, True),
    ],
)
def test_a_target_on_federated_evaluation_needs_the_median_site_too(text, mean, median, reached):
    """Issue 34: two of ten sites claiming accuracy 1.0 over 10**9 examples lifted the
    weighted mean to 0.811 (honest 0.296) and stopped the run at round 1."""
    target = Target.parse(text)
    metric = target.metric.partition(".")[2]
    row = _row(1, evaluate={metric: mean}, evaluate_median={metric: median})
    assert target.reached(row) is reached
    assert target.reached(_row(1, evaluate={metric: mean})) is (
        mean >= 0.8 if ">" in text else mean <= 0.2
    )


@pytest.mark.parametrize(
    "text", ["accuracy >= 0.9", "server.accuracy => 0.9", "server.accuracy >= high", "x.y >= 1"]
)
def test_malformed_targets_are_config_errors(text):
    with pytest.raises(FedmlError, match=r"stop\.target"):
        load_config(None, {"stop.target": text})


# -------------------------------------------------------------------- divergence guard
def test_guard_retries_with_a_lower_lr_then_stops_as_diverged():
    controls = _controls(**{"client.lr": 0.4, "guard.max_retries": 2, "guard.lr_factor": 0.5})
    good = _row(1, server={"loss": 0.5, "accuracy": 0.8})
    assert controls.judge_loss(good) is None
    controls.accept(good, {})
    assert controls.end_of_round(good, elapsed=1.0) is None

    nan = _row(2, server={"loss": float("nan"), "accuracy": 0.1})
    risen = _row(2, server={"loss": 5.1, "accuracy": 0.1})  # > 10 x best 0.5
    first, second, third = (controls.judge_loss(r) for r in (nan, risen, nan))
    assert (first.action, second.action) == ("retry", "retry")
    assert "nan" in first.reason and "> 10 x best 0.5" in second.reason
    assert (third.action, third.stop) == ("stop", "diverged")
    assert controls.client_lr(2) == pytest.approx(0.4 * 0.25)
    assert controls.judge_loss(_row(2, server={"loss": 4.9})) is None  # below 10 x best


def test_guard_factor_zero_only_catches_non_finite_losses():
    controls = _controls(**{"guard.factor": 0.0})
    controls.accept(_row(1, server={"loss": 0.1}), {})
    assert controls.judge_loss(_row(2, server={"loss": 100.0})) is None
    assert controls.judge_loss(_row(2, server={"loss": math.inf})).action == "retry"


def test_guard_watches_federated_then_train_loss_without_a_test_set():
    controls = _controls()
    assert controls.judge_loss(_row(1, evaluate={"loss": math.inf})).action == "retry"
    assert "train.loss" in controls.judge_loss(_row(1, train={"loss": math.nan})).reason


# --------------------------------------------------------------------------- participation
@pytest.mark.parametrize(
    ("policy", "actions"),
    [
        ("retry", ["retry", "retry", "stop"]),
        ("skip", ["skip", "skip", "skip"]),
        ("stop", ["stop", "stop", "stop"]),
    ],
)
def test_too_few_replies_follow_the_policy(policy, actions):
    controls = _controls(
        **{
            "participation.min_replies": 3,
            "participation.on_too_few": policy,
            "participation.max_retries": 2,
        }
    )
    assert controls.judge_participation(aggregated=3, replies=3, non_finite=0) is None
    verdicts = [controls.judge_participation(2, 2, 0) for _ in range(3)]
    assert [v.action for v in verdicts] == actions
    if policy != "skip":
        assert verdicts[-1].stop == "too few replies"
    assert "2 update(s) aggregated, 3 needed" in verdicts[0].reason


def test_mostly_non_finite_updates_are_divergence_not_absence():
    controls = _controls(**{"client.lr": 1.0})
    verdict = controls.judge_participation(aggregated=0, replies=4, non_finite=3)
    assert verdict.action == "retry" and "3 of 4 updates were non-finite" in verdict.reason
    assert controls.client_lr(1) == 0.5


# --------------------------------------------------------------------------- stop reasons
def test_end_of_round_reasons_in_priority_order():
    row = _row(5, server={"accuracy": 0.97})
    assert _controls(**{"stop.target": "server.accuracy >= 0.95"}).end_of_round(row, 0) == (
        "target reached"
    )
    assert _controls(**{"stop.max_seconds": 10.0}).end_of_round(row, 9.9) is None
    assert _controls(**{"stop.max_seconds": 10.0}).end_of_round(row, 10.0) == "time budget"
    assert _controls(rounds=5).end_of_round(row, 0) == "max rounds"
    assert _controls().end_of_round(row, 0) is None


def test_model_round_is_the_best_round_only_with_restore_best():
    on = _controls(**{"stop.metric": "server.accuracy", "stop.patience": 1})
    off = _controls(**{"stop.metric": "server.accuracy", "stop.restore_best": False})
    for controls in (on, off):
        for r, acc in enumerate([0.5, 0.9, 0.8], start=1):
            controls.end_of_round(_row(r, server={"accuracy": acc}), 0)
    assert (on.best_round, on.model_round()) == (2, 2)
    assert (off.best_round, off.model_round()) == (2, None)
    assert _controls().model_round() is None


# ---------------------------------------------------------------- lr decay, adaptive mu
def test_client_lr_decays_per_round():
    controls = _controls(**{"client.lr": 0.2, "client.lr_decay": 0.9})
    assert [controls.client_lr(r) for r in (1, 2, 4)] == pytest.approx([0.2, 0.18, 0.2 * 0.729])


def test_adaptive_mu_follows_the_fedprox_heuristic():
    mu = AdaptiveMu(FedProx(proximal_mu=0.5), step=0.1, patience=3)
    trace = []
    for loss in [1.0, 1.1, 1.0, 0.9, 0.8, 0.7, 0.6, 0.65]:
        mu.update(loss)
        trace.append(round(mu.mu, 10))
    # rise at 1.1 -> +0.1; three decreases (1.0, 0.9, 0.8) -> -0.1; then 0.7, 0.6 (two
    # decreases), 0.65 rises -> +0.1
    assert trace == [0.5, 0.6, 0.6, 0.6, 0.5, 0.5, 0.5, 0.6]


def test_adaptive_mu_never_goes_below_zero():
    mu = AdaptiveMu(FedProx(proximal_mu=0.05), step=0.1, patience=1)
    for loss in [3.0, 2.0, 1.0]:
        mu.update(loss)
    assert mu.mu == 0.0


def test_adaptive_mu_needs_fedprox():
    with pytest.raises(FedmlError, match="adaptive_mu"):
        load_config(None, {"strategy.adaptive_mu": True})
    cfg = load_config(None, {"strategy.name": "fedprox", "strategy.adaptive_mu": True})
    strategy = build_strategy(cfg)
    controls = Controls(cfg, strategy)
    assert controls.mu is not None and controls.mu.strategy is strategy  # one owner of mu
    controls.mu.update(1.0)
    controls.mu.update(2.0)  # the loss rose: mu goes up by mu_step, in the strategy itself
    assert strategy.proximal_mu == pytest.approx(cfg.strategy.proximal_mu + cfg.strategy.mu_step)


# ------------------------------------------------------------------- server optimiser
def _arrays(w: np.ndarray, steps: int = 0) -> ArrayRecord:
    return ArrayRecord({"w": Array(w.astype(np.float32)), "n": Array(np.array(steps))})


def test_server_optimizer_identity_passes_the_aggregate_through():
    aggregate = _arrays(np.ones(3))
    arrays, _ = ServerOptimizer(1.0, 0.0).step(_arrays(np.zeros(3)), aggregate)
    assert arrays is aggregate


def test_server_momentum_is_fedavgm():
    optimizer = ServerOptimizer(lr=0.5, momentum=0.9)
    w = np.zeros(3)
    velocity = np.zeros(3)
    current = _arrays(w)
    for step, target in enumerate([np.ones(3), np.full(3, 2.0), np.full(3, -1.0)]):
        aggregate = _arrays(target, steps=step + 1)
        current, state = optimizer.step(current, aggregate)
        optimizer.accept(state)
        velocity = 0.9 * velocity + (target - w) if step else target - w
        w = w + 0.5 * velocity
        np.testing.assert_allclose(current["w"].numpy(), w.astype(np.float32), rtol=1e-6)
        assert current["n"].numpy() == step + 1  # integer buffers take the aggregate


def test_a_rejected_attempt_leaves_the_momentum_untouched():
    optimizer = ServerOptimizer(lr=1.0, momentum=0.9)
    _, first = optimizer.step(_arrays(np.zeros(2)), _arrays(np.ones(2)))
    optimizer.accept(first)
    optimizer.step(_arrays(np.ones(2)), _arrays(np.full(2, 1e6)))  # rolled back: no accept
    np.testing.assert_array_equal(optimizer.velocity["w"], np.ones(2))


# ---------------------------------------------------------------------- persistence
@given(
    accuracies=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12),
    losses=st.lists(st.floats(0.01, 5.0), min_size=1, max_size=12),
)
def test_controls_state_round_trips_through_the_commit_codec(accuracies, losses):
    cfg = {
        "strategy.name": "fedprox",
        "strategy.adaptive_mu": True,
        "stop.metric": "server.accuracy",
        "server.momentum": 0.5,
    }
    controls = _controls(**cfg)
    current = _arrays(np.zeros(3))
    for r, (acc, loss) in enumerate(zip(accuracies, losses, strict=False), start=1):
        row = _row(r, server={"accuracy": acc, "loss": loss}, train={"loss": loss})
        current, velocity = controls.optimizer.step(current, _arrays(np.full(3, loss)))
        controls.accept(row, velocity)
        controls.end_of_round(row, 0)
    document, arrays = encode_state({"controls": controls.state_dict()})
    restored = _controls(**cfg)
    restored.load_state_dict(decode_state(document, arrays)["controls"])
    assert restored.early.state_dict() == controls.early.state_dict()
    assert restored.mu.state_dict() == controls.mu.state_dict()
    assert restored.guard.state_dict() == controls.guard.state_dict()
    for key, value in controls.optimizer.velocity.items():
        np.testing.assert_array_equal(restored.optimizer.velocity[key], value)
