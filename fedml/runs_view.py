"""`fedml runs`: what a run directory holds, or a table of the runs under a folder."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedml.data import effective_partition
from fedml.privacy import describe_privacy
from fedml.records import secure_text
from fedml.runstore import CONFIG, RunStatus, find_runs, run_status


def show_runs(path: Path, console: Console) -> None:
    """One run's status when `path` is a run directory, else one line per run in it."""
    if (path / CONFIG).is_file():
        print_status(run_status(path), console)
        return
    runs = find_runs(path)
    table = Table(title=f"runs in {path}", title_justify="left")
    for column in ("run", "status", "rounds", "best", "experiment"):
        table.add_column(column)
    for run in runs:
        status = run_status(run)
        table.add_row(
            run.name,
            _state_text(status),
            f"{status.rounds_done}/{status.cfg.rounds}",
            _best_text(status),
            _experiment_text(status),
        )
    console.print(table)


def print_status(status: RunStatus, console: Console) -> None:
    """The detailed view of one run."""
    table = Table(title=f"run {status.path}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("status", _state_text(status))
    table.add_row("rounds done", f"{status.rounds_done} of {status.cfg.rounds}")
    table.add_row("experiment", _experiment_text(status))
    intact = [c for c in status.commits if c.problem is None]
    if intact:
        table.add_row("last commit", f"round {intact[-1].round} at {status.last_commit_time}")
        table.add_row("commits kept", ", ".join(str(c.round) for c in status.commits))
    table.add_row("best round", _best_text(status))
    if status.privacy:
        table.add_row("privacy", describe_privacy(status.privacy))
    secure = [r for r in status.rows if r.get("secagg")]
    if secure:
        table.add_row("secure aggregation", secure_text(secure))
    for check in status.commits:
        if check.problem:
            table.add_row("[red]damaged[/]", f"{check.path.name}: {check.problem}")
    if status.lost_commits:
        table.add_row(
            "[red]damaged[/]",
            f"history.jsonl records {status.history_rounds} round(s) but commits/ holds "
            "none: the run's model and state are gone (resuming starts it over)",
        )
    if status.set_aside:
        table.add_row("set aside", f"damaged/: {', '.join(status.set_aside)}")
    if status.state == "interrupted":
        table.add_row("resume with", status.resume_command)
    if status.state == "running":
        table.add_row("", "a fedml process is writing this run now")
    console.print(table)


def _state_text(status: RunStatus) -> str:
    if status.state == "finished":
        return f"finished ({status.stop_reason})"
    return status.state


def _best_text(status: RunStatus) -> str:
    if status.best is None or status.best_metric is None:
        return "-"
    group, _, metric = status.best_metric.partition(".")
    return f"round {status.best['round']}: {status.best_metric} {status.best[group][metric]:.4f}"


def _experiment_text(status: RunStatus) -> str:
    cfg = status.cfg
    dp = "" if cfg.dp.mode == "off" else f", DP {cfg.dp.mode}"
    secure = ", secure aggregation" if cfg.secagg.enabled else ""
    if status.deployed:  # `fedml server`, `flwr run`: the nodes the rounds sampled
        nodes = max((r["clients"]["sampled"] for r in status.rows), default=0)
        return (
            f"{cfg.strategy.name}, {cfg.model.name}, up to {nodes} Flower nodes a "
            f"round, seed {cfg.seed}{dp}{secure}"
        )
    split = effective_partition(cfg.data.dataset, cfg.data.partition)
    return (
        f"{cfg.strategy.name}, {cfg.model.name} on {cfg.data.dataset} ({split}), "
        f"{cfg.simulation.clients} clients, seed {cfg.seed}{dp}{secure}"
    )
