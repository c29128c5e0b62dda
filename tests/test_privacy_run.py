"""Whole runs with differential privacy: honest epsilon, utility, budgets and resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from opacus.accountants import create_accountant

from clients.app import LocalJob
from fedml.config import load_config
from fedml.errors import FedmlError
from fedml.privacy import default_delta
from fedml.runstore import open_resume
from simulations.engine import simulate

BASE = {"simulation.clients": 4, "client.local_epochs": 1}


def _run(tmp_path: Path, name: str, **overrides):
    return simulate(load_config(None, {**BASE, **overrides, "out": str(tmp_path / name)}))


def _independent_epsilons(cfg, rounds: int) -> list[float]:
    """Each client's epsilon after `rounds` rounds, by Opacus's accountant stepped once
    per DP-SGD step: q = 1/ceil(n/B), ceil(n/B) steps per epoch, delta from n."""
    epsilons = []
    for pid in range(cfg.simulation.clients):
        n = len(LocalJob.load(cfg, pid).train)
        batches = math.ceil(n / cfg.client.batch_size)
        accountant = create_accountant(cfg.dp.accountant)
        for _ in range(rounds * cfg.client.local_epochs * batches):
            accountant.step(noise_multiplier=cfg.dp.noise_multiplier, sample_rate=1 / batches)
        epsilons.append(accountant.get_epsilon(delta=default_delta(n)))
    return epsilons


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_reported_epsilon_equals_opacus_for_the_same_noise_rate_and_steps(tmp_path, accountant):
    summary = _run(tmp_path, "run", rounds=3, **{"dp.mode": "sample", "dp.accountant": accountant})
    expected = _independent_epsilons(summary_cfg(summary), 3)
    privacy = summary.final["privacy"]
    assert privacy["clients"] == 4
    assert privacy["epsilon_max"] == pytest.approx(max(expected), rel=1e-6)
    assert privacy["epsilon_mean"] == pytest.approx(sum(expected) / 4, rel=1e-6)
    # epsilon grows round by round
    maxima = [row["privacy"]["epsilon_max"] for row in summary.history]
    assert maxima == sorted(maxima) and maxima[0] < maxima[-1]


def summary_cfg(summary):
    return load_config(summary.run_dir / "config.toml")


def test_dp_with_moderate_noise_learns_and_huge_noise_does_not(tmp_path):
    moderate = _run(tmp_path, "moderate", rounds=10, **{"dp.mode": "sample"})
    assert moderate.final["server"]["accuracy"] >= 0.80
    huge = _run(tmp_path, "huge", rounds=10, **{"dp.mode": "sample", "dp.noise_multiplier": 1000.0})
    assert huge.final["server"]["accuracy"] <= 0.30  # 10 classes: chance is 0.1
    assert huge.final["privacy"]["epsilon_max"] < 0.1


def test_dp_off_does_not_load_opacus_or_report_privacy(tmp_path):
    code = (
        "import sys; from fedml.config import load_config; "
        "from simulations.engine import simulate; "
        f"s = simulate(load_config(None, {{'rounds': 1, 'simulation.clients': 2, "
        f"'out': {str(tmp_path / 'off')!r}}})); "
        "assert 'opacus' not in sys.modules, 'opacus imported'; "
        "assert 'privacy' not in s.final; "
        "assert set(s.final['train']) == {'loss', 'num-examples'}; print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_a_target_epsilon_is_spent_by_the_planned_rounds_and_not_exceeded(tmp_path):
    summary = _run(tmp_path, "target", rounds=4, **{"dp.mode": "sample", "dp.target_epsilon": 3.0})
    assert summary.stop_reason == "max rounds"
    privacy = summary.final["privacy"]
    assert 2.9 <= privacy["epsilon_max"] <= 3.0
    assert privacy["epsilon_mean"] >= 2.9  # every client planned its own noise for 4 rounds


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_an_exhausted_budget_stops_the_run_and_resume_continues_the_ledger(tmp_path):
    dp = {"dp.mode": "sample", "dp.max_epsilon": 8.0}
    straight = _run(tmp_path, "straight", rounds=20, **dp)
    assert straight.stop_reason == "privacy budget"
    last = straight.history[-1]
    assert last["discarded"] and last["clients"]["declined"] >= 1
    assert last["clients"]["failed"] == 0  # declining is not failing
    accepted = [row for row in straight.history if "discarded" not in row]
    assert all(row["privacy"]["epsilon_max"] <= 8.0 for row in accepted)
    stop_round = last["round"]
    assert 2 <= stop_round < 20

    # The same run crashed after round 2 and resumed: the clients' ledgers come back
    # from the commit, so they decline in the same round, not 2 rounds later.
    cfg = load_config(None, {**BASE, **dp, "rounds": 20, "out": str(tmp_path / "resumed")})

    class Crash(Exception):
        pass

    def crash(row):
        if row["round"] == 2:
            raise Crash

    with pytest.raises(Crash):
        simulate(cfg, on_round=crash)
    store, cfg = open_resume(tmp_path / "resumed", {})
    resumed = simulate(cfg, resume=store)
    assert resumed.stop_reason == "privacy budget"
    assert resumed.history[-1]["round"] == stop_round
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(_rows(tmp_path / "resumed")) == strip(_rows(tmp_path / "straight"))

    # and a run stopped by its budget stays stopped when resumed
    store, cfg = open_resume(tmp_path / "straight", {"rounds": 30})
    again = simulate(cfg, resume=store)
    assert again.stop_reason == "privacy budget" and again.history == straight.history


def test_client_level_dp_reports_the_epsilon_of_its_releases(tmp_path):
    summary = _run(
        tmp_path,
        "user",
        rounds=3,
        **{"dp.mode": "user-fixed", "dp.noise_multiplier": 0.8, "dp.clip_norm": 0.5},
    )
    accountant = create_accountant("rdp")
    for _ in range(3):
        accountant.step(noise_multiplier=0.8, sample_rate=1.0)
    privacy = summary.final["privacy"]
    assert privacy["level"] == "user" and privacy["releases"] == 3
    assert privacy["delta"] == default_delta(4)
    assert privacy["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-2), rel=1e-6)
    assert privacy["clip_norm"] == 0.5


def test_client_level_budget_stops_before_the_release_that_would_exceed_it(tmp_path):
    summary = _run(
        tmp_path,
        "budget",
        rounds=20,
        **{"dp.mode": "user-adaptive", "dp.noise_multiplier": 0.3, "dp.max_epsilon": 30.0},
    )
    assert summary.stop_reason == "privacy budget"
    assert summary.rounds < 20
    assert summary.final["privacy"]["epsilon"] <= 30.0
    assert summary.final["privacy"]["clip_norm"] != 1.0  # the adaptive norm moved


def test_client_level_dp_averages_updates_with_equal_weights(tmp_path):
    from strategies import build_strategy

    cfg = load_config(None, {**BASE, "dp.mode": "user-fixed"})
    assert build_strategy(cfg).strategy.uniform_weights is True
    assert build_strategy(load_config(None, BASE)).uniform_weights is False


def test_a_model_dp_sgd_cannot_train_fails_before_the_run_directory_exists(tmp_path):
    (tmp_path / "bn_model.py").write_text(
        "from torch import nn\n"
        "def build(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8),\n"
        "                         nn.Linear(8, num_classes))\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(FedmlError, match="BatchNorm"):
            _run(
                tmp_path,
                "refused",
                rounds=1,
                **{"dp.mode": "sample", "model.name": "bn_model:build"},
            )
        assert not (tmp_path / "refused").exists()
        fixed = _run(
            tmp_path,
            "fixed",
            rounds=1,
            **{"dp.mode": "sample", "model.name": "bn_model:build", "dp.fix_model": True},
        )
        assert fixed.final["privacy"]["clients"] == 4
    finally:
        sys.path.remove(str(tmp_path))


def test_adaptive_clipping_with_its_default_noise_runs_for_few_clients(tmp_path):
    """Flower's adaptive clipping spends part of the noise on the clipped count, whose
    default std (4 sampled / 20) is too small for noise 1.0: fedml raises the count's
    std to the noise multiplier instead of refusing the run (it used to refuse)."""
    summary = _run(tmp_path, "adaptive", rounds=1, **{"dp.mode": "user-adaptive"})
    privacy = summary.final["privacy"]
    assert privacy["level"] == "user" and privacy["noise_multiplier"] == 1.0
    assert privacy["epsilon"] > 0
