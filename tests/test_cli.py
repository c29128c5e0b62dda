"""The `fedml` command: a real process, its output and its exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FEDML = [sys.executable, "-m", "fedml.cli"]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "120"}


def _run(*args, cwd=None, env_columns=None):
    env = ENV if env_columns is None else {**ENV, "COLUMNS": str(env_columns)}
    return subprocess.run(
        [*FEDML, *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd
    )


def test_simulate_prints_progress_and_summary(tmp_path):
    out = tmp_path / "run"
    result = _run(
        "simulate", "--rounds", "2", "--clients", "4", "--local-epochs", "1", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert "round 1" in result.stdout and "round 2" in result.stdout
    assert "fedml run summary" in result.stdout and str(out) in result.stdout.replace("\n", "")
    assert "INFO" not in result.stdout + result.stderr  # Flower's chatter needs --verbose
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(rows) == 2


def test_default_run_directory_is_timestamped_under_runs(tmp_path):
    result = _run(
        "simulate", "--rounds", "1", "--clients", "2", "--local-epochs", "1", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--fraction-train", "0"], "fraction_train must be in (0, 1]"),
        (["--clients", "0"], "simulation.clients must be at least 1"),
        (["--dataset", "npz:/no/such/place"], "does not exist"),
        (["--strategy", "fedprx"], "Did you mean 'fedprox'"),
        (["nonexistent.toml"], "Config file nonexistent.toml does not exist"),
        (["--target", "accuracy > 0.9"], "stop.target 'accuracy > 0.9' is not a condition"),
        (["--early-stop", "accuracy"], "stop.metric 'accuracy' is not a metric the run records"),
        (["--dropout", "1"], "simulation.dropout must be a fraction in [0, 1)"),
        (["--min-replies", "20"], "participation.min_replies is 20"),
        (["--engine", "dask"], "simulation.engine 'dask' is unknown. Use one of: inprocess, ray"),
        (["--engine", "ray", "--num-cpus", "0"], "simulation.num_cpus (whole CPUs per Ray"),
        (["--engine", "ray", "--num-gpus", "-0.5"], "simulation.num_gpus (GPUs per Ray client"),
        (["--seed", "4294967296"], "seed must be a whole number 0 .. 4294967295"),
        (["--lr", "inf"], "client.lr must be a finite number, got inf"),
        (["--server-lr", "inf"], "server.lr must be a finite number, got inf"),
    ],
)
def test_bad_input_is_one_clear_error_exit_2(tmp_path, args, fragment):
    result = _run("simulate", *args, "--out", str(tmp_path / "never"))
    assert result.returncode == 2
    assert fragment in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "never").exists()


def test_help_lists_every_simulate_flag():
    result = _run("simulate", "--help")
    assert result.returncode == 0
    for flag in (
        "--strategy",
        "--rounds",
        "--clients",
        "--fraction-train",
        "--dataset",
        "--partition",
        "--model",
        "--local-epochs",
        "--batch-size",
        "--lr",
        "--proximal-mu",
        "--stragglers",
        "--seed",
        "--device",
        "--out",
        "--dropout",
        "--lr-decay",
        "--server-lr",
        "--server-momentum",
        "--min-replies",
        "--round-timeout",
        "--early-stop",
        "--patience",
        "--target",
        "--max-seconds",
        "--no-report",
        "--tensorboard",
        "--mlflow",
        "--engine",
        "--num-cpus",
        "--num-gpus",
        "--ray-address",
    ):
        assert flag in result.stdout


def test_controls_from_the_command_line_stop_the_run_and_say_why(tmp_path):
    out = tmp_path / "run"
    result = _run(
        "simulate",
        "--rounds", "40",
        "--early-stop", "server.loss",
        "--patience", "1",
        "--target", "server.accuracy >= 0.999",
        "--server-momentum", "0.5",
        "--dropout", "0.2",
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert rows[-1]["stop"] == "early stop" and len(rows) < 40
    assert all(row["clients"]["dropped"] == 2 for row in rows)
    assert "early stop" in result.stdout
    best = min(rows, key=lambda row: row["server"]["loss"])
    if best["round"] != rows[-1]["round"]:
        assert f"round {best['round']} (best, restored)" in result.stdout


def test_dp_flags_run_dp_sgd_and_the_run_reports_its_epsilon(tmp_path):
    out = tmp_path / "run"
    result = _run(
        "simulate",
        "--rounds", "2",
        "--clients", "3",
        "--local-epochs", "1",
        "--dp", "sample",
        "--target-epsilon", "5",
        "--max-grad-norm", "2.0",
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    spent = rows[-1]["privacy"]["epsilon_max"]
    assert 4.9 <= spent <= 5.0
    assert f"epsilon max {spent:.3g}" in result.stdout
    shown = _run("runs", str(out))
    assert "DP sample" in shown.stdout and f"epsilon max {spent:.3g}" in shown.stdout
    bad = _run("simulate", "--dp", "central", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "dp.mode 'central' is unknown" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_simulate_writes_a_report_and_feeds_the_trackers_asked_for(tmp_path):
    out, logs, db = tmp_path / "run", tmp_path / "tb", tmp_path / "mlflow.db"
    result = _run(
        "simulate", "--rounds", "2", "--clients", "3", "--local-epochs", "1",
        "--out", str(out), "--tensorboard", str(logs), "--mlflow", str(db),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown = " ".join(result.stdout.split())
    assert f"report │ {out / 'report'}" in shown
    assert f"TensorBoard │ {logs / 'run'}" in shown and f"MLflow │ sqlite:///{db}" in shown
    assert sorted(p.name for p in (out / "report").iterdir()) == [
        "accuracy.png", "clients.png", "loss.png", "rounds.csv", "sites.csv", "sites.png",
        "summary.csv", "time.png",
    ]  # fmt: skip
    assert any((logs / "run").glob("events.out.tfevents.*")) and db.is_file()
    quiet = _run(
        "simulate", "--rounds", "1", "--clients", "2", "--local-epochs", "1",
        "--out", str(tmp_path / "quiet"), "--no-report",
    )  # fmt: skip
    assert quiet.returncode == 0, quiet.stderr
    assert not (tmp_path / "quiet" / "report").exists() and "│ report" not in quiet.stdout


def test_report_overlays_runs_and_explains_what_it_cannot_plot(tmp_path):
    for name in ("a", "b"):
        done = _run(
            "simulate", "--rounds", "2", "--clients", "2", "--local-epochs", "1",
            "--out", str(tmp_path / "runs" / name), "--no-report",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    result = _run("report", str(tmp_path / "runs"), "--out", str(tmp_path / "cmp"))
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "cmp" / "accuracy.png") in result.stdout
    summary = (tmp_path / "cmp" / "summary.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in summary] == ["run", "a", "b"]
    missing = _run("report", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "nowhere does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_each_config_option_is_in_the_one_flag_table_and_sets_a_real_key():
    """A flag is tied to the run config in `CONFIG_FLAGS` only: every entry names an
    option of `fedml simulate` or `fedml server` and an existing config key, and every
    other option is one of the few that do not change the run config."""
    import inspect

    from fedml.cli import CONFIG_FLAGS, config_overrides, server, simulate
    from fedml.config import RunConfig

    assert set(CONFIG_FLAGS.values()) <= set(RunConfig().to_flat())
    options = set(inspect.signature(simulate).parameters) | set(
        inspect.signature(server).parameters
    )
    assert set(CONFIG_FLAGS) <= options
    not_config = {"ctx", "config", "resume", "report", "tensorboard", "mlflow", "verbose"}
    deployment = {"pki", "insecure", "host", "port", "wait_for_sites", "sites"}
    assert options - set(CONFIG_FLAGS) == not_config | deployment
    given = config_overrides({"lr": 0.3, "out": Path("runs/x"), "verbose": True, "seed": None})
    assert given == {"client.lr": 0.3, "out": "runs/x", "seed": None}


def test_help_shows_each_config_options_default_from_the_embedded_config():
    """`--help` shows what a flag left out means: the embedded config's value of its key
    (the options stay None so that a CONFIG file's value is not overridden)."""
    import typer.main
    from typer.testing import CliRunner

    from fedml.cli import CONFIG_FLAGS, app
    from fedml.config import RunConfig

    defaults = RunConfig().to_flat()
    commands = typer.main.get_command(app).commands
    for command in ("simulate", "server"):
        for param in commands[command].params:
            if param.name not in CONFIG_FLAGS or param.name == "out":
                continue
            expected = defaults[CONFIG_FLAGS[param.name]]
            if isinstance(expected, bool):
                shown = "on" if expected else "off"
            else:
                shown = str(expected) if expected != "" else "none"
            assert param.default is None and param.show_default == shown, param.name
    assert "[default: (fedavg)]" in CliRunner().invoke(app, ["simulate", "--help"]).output


def test_ctrl_c_says_what_was_kept(tmp_path):
    """Ctrl-C's last line names what survives: nothing, no round yet, or the rounds."""
    from fedml.cli import _stopped_message
    from fedml.config import load_config
    from fedml.runstore import RunStore

    cfg = load_config(None, {"out": str(tmp_path / "run"), "rounds": 2})
    assert "nothing was written" in _stopped_message(None)
    assert "nothing was written" in _stopped_message(cfg)
    RunStore.create(tmp_path / "run", cfg).close()
    assert "before any round was committed" in _stopped_message(cfg)
    from simulations.engine import simulate

    simulate(load_config(None, {"out": str(tmp_path / "done"), "rounds": 2}))
    done = load_config(None, {"out": str(tmp_path / "done")})
    assert "stopped: 2 committed round(s) are kept" in _stopped_message(done)


def test_version_short_help_and_the_presets_in_simulates_help():
    from fedml import __version__
    from simulations.presets import preset_names

    assert _run("--version").stdout.strip() == f"fedml {__version__}"
    helped = _run("simulate", "-h", env_columns=200)
    assert helped.returncode == 0
    for name in preset_names():  # the docstring lists every bundled preset
        assert name in helped.stdout
