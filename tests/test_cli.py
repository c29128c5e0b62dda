"""The `fedml` command: a real process, its output and its exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

FEDML = [sys.executable, "-m", "fedml.cli"]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "120"}


def _run(*args, cwd=None):
    return subprocess.run(
        [*FEDML, *args], capture_output=True, text=True, timeout=300, env=ENV, cwd=cwd
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
    ):
        assert flag in result.stdout
