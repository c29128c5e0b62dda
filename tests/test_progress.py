"""The progress display on a terminal: it fits 80 columns without cutting a value, and
says what it is waiting for before the first round."""

from __future__ import annotations

import io

from rich.console import Console

import fedml.progress
from fedml.config import load_config
from fedml.progress import describe_row, round_progress, run_with_progress
from fedml.server import RunSummary

A_BUSY_ROUND = {
    "round": 7,
    "train": {"loss": 0.1234},
    "server": {"accuracy": 0.95},
    "clients": {"aggregated": 5, "sampled": 10, "rejected": 2, "declined": 1},
    "privacy": {"epsilon_max": 3.2, "epsilon_mean": 3.1, "level": "sample"},
    "retries": ["diverged"],
    "stop": "max rounds",
}


def _terminal(width: int) -> Console:
    return Console(width=width, force_terminal=True, record=True, file=io.StringIO())


def test_an_80_column_terminal_shows_the_bar_the_count_the_time_and_every_value():
    console = _terminal(80)
    progress = round_progress(console)
    task = progress.add_task("starting", total=15)
    progress.update(task, completed=7, description=describe_row(A_BUSY_ROUND))
    console.print(progress.make_tasks_table(progress.tasks))
    lines = console.export_text().rstrip("\n").splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert "━" in lines[0] and " 7/15 " in lines[0] and "0:00:00" in lines[0]
    shown = " ".join(" ".join(line.split()) for line in lines)
    for value in describe_row(A_BUSY_ROUND).split(", "):
        assert value in shown, value  # wrapped under itself, never cut


def test_the_ray_engine_says_it_is_starting_ray_until_the_first_round(monkeypatch, tmp_path):
    cfg = load_config(None, {"simulation.engine": "ray", "out": str(tmp_path / "run")})
    monkeypatch.setattr(fedml.progress, "simulate", lambda *a, **k: RunSummary.__new__(RunSummary))
    console = _terminal(100)
    run_with_progress(cfg, console)
    shown = console.export_text()
    assert "0/20" in shown and "starting Ray and its actors" in shown
