"""Strategy plugins: discovery by entry point and by module:Class, and every error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
from safetensors.numpy import load_file

from fedml.config import load_config
from fedml.errors import FedmlError
from fedml.server import Experiment
from simulations.engine import simulate
from strategies import available, build_strategy, resolve

EXAMPLE = Path(__file__).parents[1] / "examples" / "plugin-fedavg-clipped"
FEDML = [sys.executable, "-m", "fedml.cli"]


def _registration() -> tuple[str, str, str]:
    """(distribution, name, reference) as the example's pyproject declares them."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    ((name, reference),) = project["entry-points"]["fedml.strategies"].items()
    return project["name"], name, reference


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch) -> Path:
    """The example plugin as pip would lay it out: its module and a dist-info folder
    with its entry points, in a directory on sys.path (no network, no build)."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(EXAMPLE / "fedavg_clipped.py", site)
    distribution, name, reference = _registration()
    info = site / f"{distribution.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[fedml.strategies]\n{name} = {reference}\n")
    monkeypatch.syspath_prepend(str(site))
    return site


def test_an_installed_plugin_is_listed_with_its_origin(installed_plugin):
    entry = available()["fedavg-clipped"]
    assert entry.origin == "plugin (fedml-plugin-fedavg-clipped)"
    assert entry.reference == "fedavg_clipped:FedAvgClipped"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed_plugin), *sys.path])}
    listing = subprocess.run(
        [*FEDML, "strategies"], capture_output=True, text=True, timeout=120, env=env
    )
    assert listing.returncode == 0, listing.stderr
    assert "fedavg-clipped" in listing.stdout and "plugin" in listing.stdout
    assert "fedavg" in listing.stdout and "built-in" in listing.stdout
    config = installed_plugin.parent / "run.toml"
    config.write_text('[strategy]\nname = "fedavg-clipped"\nclip_norm = 0.5\n')
    out = installed_plugin.parent / "cli-run"
    run = subprocess.run(
        [*FEDML, "simulate", str(config), "--rounds", "1", "--clients", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "clip_norm = 0.5" in (out / "config.toml").read_text()
    assert len((out / "history.jsonl").read_text().splitlines()) == 1


def _update_norm(run: Path, cfg) -> float:
    """L2 norm of (w_1 - w_0): the run's model after round 1 against the initial one."""
    initial = Experiment.prepare(cfg).evaluator.model.state_dict()
    final = load_file(run / "model.safetensors")
    total = 0.0
    for key, value in final.items():
        start = initial[key].numpy()
        if value.dtype.kind == "f":
            total += float(np.sum((value.astype(np.float64) - start) ** 2))
    return total**0.5


@pytest.mark.parametrize("name", ["fedavg-clipped", "fedavg_clipped:FedAvgClipped"])
def test_a_plugin_runs_a_round_with_its_options_from_the_strategy_table(
    installed_plugin, tmp_path, name
):
    overrides = {
        "rounds": 1,
        "simulation.clients": 3,
        "client.local_epochs": 1,
        "strategy.name": name,
        "strategy.clip_norm": 0.01,
        "out": str(tmp_path / "run"),
    }
    cfg = load_config(None, overrides)
    summary = simulate(cfg)
    assert summary.final["clients"]["aggregated"] == 3
    # every update was clipped to 0.01, so their average moved the model by at most that
    assert 0 < _update_norm(tmp_path / "run", cfg) <= 0.01 + 1e-6
    # the option is part of the stored experiment
    stored = load_config(tmp_path / "run" / "config.toml")
    assert stored.strategy.options == {"clip_norm": 0.01} and stored == cfg


def test_the_module_class_form_needs_no_installation(tmp_path, monkeypatch):
    """A module on the path is enough. The example's file is copied under a name that
    nothing installs: following README's walkthrough (`pip install -e` of the example,
    which leaves an .egg-info next to it) must not change what this test sees."""
    shutil.copy(EXAMPLE / "fedavg_clipped.py", tmp_path / "uninstalled_plugin.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not any(e.reference.startswith("uninstalled_plugin:") for e in available().values())
    cls = resolve("uninstalled_plugin:FedAvgClipped")
    assert cls.__name__ == "FedAvgClipped" and cls.__module__ == "uninstalled_plugin"


def test_an_unknown_name_suggests_close_ones():
    with pytest.raises(FedmlError, match=r"Unknown strategy 'fedprx'\. Did you mean 'fedprox'"):
        resolve("fedprx")


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("no_such_module_xyz:Strategy", "module 'no_such_module_xyz' cannot be imported"),
        ("strategies.fedavg:Nope", "module 'strategies.fedavg' has no 'Nope'"),
        ("collections:OrderedDict", "is not a subclass of flwr.serverapp.strategy.Strategy"),
        ("strategies.fedavg:", "is not a 'module:Class' reference"),
    ],
)
def test_a_bad_reference_is_named(reference, message):
    with pytest.raises(FedmlError, match=message):
        resolve(reference)


def test_options_the_strategy_does_not_accept_are_named(installed_plugin):
    cfg = load_config(None, {"strategy.name": "fedavg-clipped", "strategy.clip_nrom": 1.0})
    with pytest.raises(
        FedmlError, match=r"does not accept 'clip_nrom' \(did you mean 'clip_norm'\?\)"
    ):
        build_strategy(cfg)
    builtin = load_config(None, {"strategy.name": "fedavg", "strategy.momentum": 0.9})
    with pytest.raises(FedmlError, match=r"'fedavg' .* does not accept 'momentum'"):
        build_strategy(builtin)


def test_a_constructor_that_refuses_its_options_is_a_clear_error(installed_plugin):
    cfg = load_config(None, {"strategy.name": "fedavg-clipped", "strategy.clip_norm": -1.0})
    with pytest.raises(FedmlError, match=r"could not be built.*clip_norm must be > 0"):
        build_strategy(cfg)


def test_a_strategy_option_must_be_a_toml_value():
    with pytest.raises(FedmlError, match="strategy option and must be a number"):
        load_config(None, {"strategy.weights": {"a": 1}})


def test_cli_errors_for_strategies_print_one_line_and_write_nothing(tmp_path):
    result = subprocess.run(
        [*FEDML, "simulate", "--strategy", "collections:OrderedDict", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "is not a subclass of flwr.serverapp.strategy.Strategy" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "r").exists()


def test_client_level_dp_refuses_a_strategy_that_is_not_fedavg_based(monkeypatch):
    monkeypatch.setattr(
        "strategies.registry.BUILTIN", {"median": "flwr.serverapp.strategy:FedMedian"}
    )
    cfg = load_config(None, {"strategy.name": "median", "dp.mode": "user-fixed"})
    with pytest.raises(FedmlError, match="needs a strategy built on fedml's FedAvg"):
        build_strategy(cfg)


def test_a_stateless_plugin_resumes_and_says_its_state_restarts(tmp_path, caplog):
    """Flower's stock FedAvg, named as module:Class: no state_dict(), so resume warns
    (its sampling uses Flower's global RNG, which fedml cannot restore)."""
    from fedml.runstore import open_resume

    overrides = {
        "rounds": 2,
        "simulation.clients": 3,
        "client.local_epochs": 1,
        "strategy.name": "flwr.serverapp.strategy:FedAvg",
        "out": str(tmp_path / "run"),
    }

    class Crash(Exception):
        pass

    def crash(row):
        raise Crash

    with pytest.raises(Crash):
        simulate(load_config(None, overrides), on_round=crash)
    store, cfg = open_resume(tmp_path / "run", {})
    with caplog.at_level("WARNING"):
        summary = simulate(cfg, resume=store)
    assert summary.resumed_from == 1 and summary.rounds == 2
    assert "strategy FedAvg has no committed state" in caplog.text
    assert "its internal state restarts on resume" in caplog.text
