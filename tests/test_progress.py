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


def _round(number: int, **extra) -> dict:
    clients = {"sampled": 3, "aggregated": 2, "failed": 1, "rejected": 0, "declined": 0}
    return {"round": number, "clients": clients, **extra}


def test_the_progress_line_names_why_sites_failed_and_what_secure_aggregation_did():
    secagg = {"sampled": 3, "shared": 3, "unmasked": 2, "dropped": 1}
    line = describe_row(_round(4, failed_reasons={"site c: FedmlError: bad": 1}, secagg=secagg))
    assert "failed 1 (1x site c: FedmlError: bad)" in line
    assert "secure aggregation: 2 updates masked, only their sum unmasked (1 dropped out)" in line
    assert "secure" not in describe_row(_round(5))
    hostile = describe_row(_round(6, secagg={**secagg, "dropped": 0, "excluded": 1}))
    assert "only their sum unmasked (1 left out as hostile)" in hostile


def test_a_reason_failing_three_rounds_in_a_row_is_said_once_loudly():
    from fedml.progress import RepeatedFailures

    watch = RepeatedFailures()
    seen = [
        watch.warnings(_round(r, failed_reasons=reasons))
        for r, reasons in enumerate(
            [{"a": 1}, {"a": 1, "b": 1}, {"b": 1}, {"a": 1, "b": 1}, {"a": 1, "b": 1}, {"a": 1}],
            start=1,
        )
    ]
    # "a" breaks its streak in round 3 and reaches 3 again in round 6; "b" in round 4
    assert seen[:3] == [[], [], []]
    assert seen[3] == ["WARNING: failed in each of the last 3 rounds: b"]
    assert seen[4] == [] and seen[5] == ["WARNING: failed in each of the last 3 rounds: a"]


def test_the_summary_says_how_many_updates_reached_the_server_only_masked(tmp_path):
    from fedml.progress import print_summary

    rows = [
        _round(r, secagg={"unmasked": 3, "dropped": 0}, server={"accuracy": 0.5, "loss": 1.0})
        for r in (1, 2)
    ]
    out = io.StringIO()
    summary = RunSummary(tmp_path, 2, 1.0, rows)
    print_summary(summary, Console(file=out, width=200))
    assert "6 site updates reached the server only masked, over 2 rounds" in out.getvalue()


def test_a_sites_reason_is_printed_as_text_never_as_markup():
    out = io.StringIO()
    line = describe_row(_round(1, failed_reasons={"[/] [bold]x[/bold]": 1}))
    Console(file=out, width=200).print(line)  # a hostile site's reason must not raise
    assert "[/] [bold]x[/bold]" in out.getvalue()
