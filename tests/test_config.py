"""RunConfig: TOML + overrides, flat round trip, one clear error per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedml.config import RunConfig, check_dp_flags, load_config, with_overrides
from fedml.errors import FedmlError
from simulations.presets import resolve_config


def test_defaults_are_the_documented_embedded_run():
    cfg = load_config(None)
    assert cfg.strategy.name == "fedavg"
    assert cfg.simulation.clients == 10
    assert cfg.data.dataset == "digits"
    assert cfg.model.name == "mlp"


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rounds = 7\n[client]\nlr = 0.5\n[data]\ndataset = "breast-cancer"\n')
    cfg = load_config(path, {"client.lr": 0.25, "seed": None})
    assert cfg.rounds == 7
    assert cfg.client.lr == 0.25  # CLI wins
    assert cfg.data.dataset == "breast-cancer"
    assert cfg.seed == 0  # None means "not given"


def test_flat_round_trip_and_toml_round_trip(tmp_path):
    cfg = load_config(None, {"client.lr": 0.3, "strategy.name": "fedprox"})
    assert RunConfig.from_flat(cfg.to_flat()) == cfg
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


def test_int_is_accepted_for_float():
    assert load_config(None, {"client.lr": 1}).client.lr == 1.0


def test_preset_by_name():
    cfg = load_config(resolve_config(Path("fedprox-synthetic")))
    assert cfg.strategy.name == "fedprox"
    assert cfg.data.dataset == "synthetic:1,1"
    dp = load_config(resolve_config(Path("digits-dp"))).dp
    assert (dp.mode, dp.target_epsilon, dp.max_epsilon) == ("sample", 8.0, 0.0)
    paper = load_config(resolve_config(Path("fedavg-mnist")))  # McMahan et al.'s setting
    assert (paper.data.dataset, paper.model.name, paper.simulation.clients) == (
        "mnist-5k", "cnn", 100,
    )  # fmt: skip
    assert (paper.strategy.fraction_train, paper.client.local_epochs) == (0.1, 5)
    assert (paper.client.batch_size, paper.stop.target) == (10, "server.accuracy >= 0.95")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"client.lrr": 0.1}, "Did you mean 'client.lr'"),
        ({"client.learning_rate": 0.1}, "Did you mean 'client.lr'?"),  # its initials
        ({"stop.metric": "server.los"}, "Did you mean 'server.loss'?"),  # never fired before
        ({"stop.target": "server.acc >= 0.5"}, "Did you mean 'server.accuracy'?"),
        ({"checkpoint.monitor": "evaluate.f2"}, "not a metric the run records"),
        ({"bogus": 1}, "Unknown config key 'bogus'"),
        ({"client.lr": "fast"}, "'client.lr' must be float"),
        ({"rounds": 2.5}, "'rounds' must be int"),
        ({"rounds": True}, "got a boolean"),
        ({"strategy.fraction_train": 0.0}, "fraction_train must be in (0, 1]"),
        ({"simulation.clients": 0}, "simulation.clients must be at least 1"),
        ({"simulation.clients": 1}, "min_train_clients is 2 but the federation has only 1"),
        ({"data.dataset": "npz:/no/such/dir"}, "does not exist"),
        ({"data.dataset": "mnist"}, "data.dataset 'mnist' is unknown"),
        ({"data.partition": "dirichlet:-1"}, "data.partition 'dirichlet:-1' is not valid"),
        ({"client.optimizer": "lbfgs"}, "client.optimizer 'lbfgs' is unknown"),
        ({"client.device": "tpu"}, "client.device 'tpu' is unknown"),
        ({"simulation.stragglers": 1.5}, "stragglers must be a fraction"),
        ({"rounds": 0}, "rounds must be at least 1"),
    ],
)
def test_bad_values_raise_one_clear_error(overrides, fragment):
    with pytest.raises(FedmlError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value)


def test_bad_toml_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("rounds = = 3\n")
    with pytest.raises(FedmlError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(FedmlError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    path.write_text("[client]\nlr = 0.1\n[client.extra]\nx = 1\n")
    with pytest.raises(FedmlError, match=r"\[client.extra\] is not a known config table"):
        load_config(path)


def test_flower_app_config_in_pyproject_matches_the_defaults():
    """`flwr run` reads [tool.flwr.app.config]; it must be exactly RunConfig's defaults."""
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    app = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedml.server:app", "clientapp": "clients.app:app"}
    assert app["config"] == RunConfig().to_flat()


def test_resume_identity_treats_keys_added_later_as_their_defaults():
    from fedml.config import experiment_identity, identity_changes

    current = experiment_identity(RunConfig())
    older_run = {k: v for k, v in current.items() if k != "client.weight_decay"}
    assert identity_changes(older_run, current) == []
    changed = experiment_identity(with_overrides(RunConfig(), {"client.weight_decay": 0.1}))
    assert identity_changes(older_run, changed) == ["client.weight_decay: 0.0 -> 0.1"]
    assert identity_changes(current, {**current, "seed": 5}) == ["seed: 0 -> 5"]


def test_the_servers_own_paths_replace_only_fedml_servers_placeholders(monkeypatch):
    import json

    from fedml.config import SERVER_LOCAL, SERVER_LOCAL_ENV, with_server_local

    sent = {"rounds": 3, **SERVER_LOCAL}
    assert with_server_local(sent) == sent  # no variable: unchanged
    local = {"out": "/srv/runs/r1", "data.dataset": "npz:/srv/shards"}
    monkeypatch.setenv(SERVER_LOCAL_ENV, json.dumps(local))
    assert with_server_local(sent) == {"rounds": 3, **local}
    other = {"rounds": 3, "out": "/elsewhere", "data.dataset": "digits"}  # another run
    assert with_server_local(other) == other


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("client.lr", 1e308),
        ("client.lr", 1e4),
        ("server.lr", 1e308),
        ("strategy.proximal_mu", 1e300),
        ("client.weight_decay", 1e9),
    ],
)
def test_step_sizes_a_float32_step_cannot_survive_are_refused(key, value):
    """Issue 34: --lr 1e308 was accepted; every client then failed, and the run ended
    "too few replies" with the cause only in a debug log."""
    with pytest.raises(FedmlError, match=rf"{key} must be in .*1000"):
        load_config(None, {key: value})
    assert load_config(None, {key: 1000.0}) is not None  # the bound itself is allowed


@pytest.mark.parametrize("key", ["dp.noise_multiplier", "dp.target_epsilon", "dp.max_grad_norm"])
def test_dp_settings_given_while_dp_is_off_are_an_error_not_ignored(key):
    """Issue 34: --noise-multiplier without --dp was ignored silently."""
    with pytest.raises(FedmlError, match=rf"{key} only apply with differential privacy on"):
        check_dp_flags(load_config(None, {key: 2.0}), {key: 2.0})
    private = load_config(None, {key: 2.0, "dp.mode": "sample"})
    check_dp_flags(private, {key: 2.0})  # DP on: they apply
    check_dp_flags(load_config(None), {key: None})  # an option left out
    check_dp_flags(load_config(None, {key: 2.0}), {})  # a config file may keep them


def test_the_cli_refuses_a_noise_multiplier_without_dp(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "fedml.cli", "simulate", "--noise-multiplier", "1.2",
         "--rounds", "1", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "only apply with differential privacy on" in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"client.local_steps": -1}, r"client\.local_steps must be 0 \(use local_epochs\)"),
        ({"client.local_steps": 10, "dp.mode": "sample"}, "DP-SGD's privacy accounting"),
    ],
)
def test_local_steps_that_cannot_work_are_one_clear_error(overrides, fragment):
    with pytest.raises(FedmlError, match=fragment):
        load_config(None, overrides)
