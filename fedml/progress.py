"""Progress while a run goes, and the one-screen summary when it ends."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from fedml.config import RunConfig
from fedml.privacy import describe_privacy
from fedml.records import HistoryRow, describe_secagg, describe_sites, secure_text
from fedml.runstore import RunStore
from fedml.server import RoundCallback, RunSummary
from simulations.engine import simulate

if TYPE_CHECKING:  # a type hint only: trackers import their packages when asked for
    from fedml.trackers import Tracker


def describe_row(row: HistoryRow) -> str:
    """One history row as the progress line shows it."""
    parts = [f"round {row['round']}"]
    if row.get("train"):
        parts.append(f"train loss {row['train']['loss']:.4f}")
    if row.get("server"):
        parts.append(f"test acc {row['server']['accuracy']:.4f}")
    elif row.get("evaluate"):
        parts.append(f"fed acc {row['evaluate']['accuracy']:.4f}")
    clients = row["clients"]
    parts.append(f"clients {clients['aggregated']}/{clients['sampled']}")
    if clients.get("rejected"):
        parts.append(f"rejected {clients['rejected']}")
    if clients.get("failed"):
        reasons = row.get("failed_reasons", {})
        why = "; ".join(f"{n}x {escape(reason)}" for reason, n in reasons.items())
        parts.append(f"failed {clients['failed']}" + (f" ({why})" if why else ""))
    if clients.get("declined"):
        parts.append(f"declined {clients['declined']} (privacy budget)")
    if row.get("privacy"):
        parts.append(describe_privacy(row["privacy"], with_delta=False))
    if row.get("secagg"):
        parts.append(describe_secagg(row["secagg"]))
    if row.get("retries"):
        parts.append(f"retried {len(row['retries'])}x ({row['retries'][-1]})")
    if row.get("stop"):
        parts.append(f"stop: {row['stop']}")
    return ", ".join(parts)


class RepeatedFailures:
    """Watches the rounds for a failure that keeps coming back: a reason seen in
    `LOUD_AFTER` rounds in a row (a site that fails every task) is said once, loudly,
    so a deployment's operator does not have to read every progress line."""

    LOUD_AFTER = 3

    def __init__(self) -> None:
        self.streaks: dict[str, int] = {}

    def warnings(self, row: HistoryRow) -> list[str]:
        reasons = row.get("failed_reasons", {})
        self.streaks = {r: self.streaks.get(r, 0) + 1 for r in reasons}
        return [
            f"WARNING: failed in each of the last {self.LOUD_AFTER} rounds: {reason}"
            for reason, streak in self.streaks.items()
            if streak == self.LOUD_AFTER
        ]


def round_progress(console: Console) -> Progress:
    """The progress display: a short bar, rounds done of planned and the elapsed time,
    then the newest round's line, which wraps under itself rather than being cut, so
    that an 80-column terminal shows all of it."""
    return Progress(
        TextColumn("[bold]rounds"),
        BarColumn(bar_width=16),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}", table_column=Column(ratio=1, overflow="fold")),
        console=console,
        transient=False,
        expand=True,
    )


def run_with_progress(
    cfg: RunConfig,
    console: Console,
    resume: RunStore | None = None,
    on_round: RoundCallback | None = None,
) -> RunSummary:
    """Run (or resume) the simulation with a progress bar on a terminal, plain lines
    otherwise; `on_round` also receives each committed row (trackers)."""

    def also(show: RoundCallback) -> RoundCallback:
        def both(row: HistoryRow) -> None:
            show(row)
            if on_round is not None:
                on_round(row)

        return both

    if not console.is_terminal:
        return simulate(
            cfg,
            on_round=also(lambda row: console.print(describe_row(row), highlight=False)),
            resume=resume,
        )
    with round_progress(console) as progress:
        starting = "starting Ray and its actors" if cfg.simulation.engine == "ray" else "starting"
        task = progress.add_task(starting, total=cfg.rounds)

        def advance(row: HistoryRow) -> None:
            progress.update(task, completed=row["round"], description=describe_row(row))

        return simulate(cfg, on_round=also(advance), resume=resume)


def print_summary(
    summary: RunSummary,
    console: Console,
    trackers: Sequence[Tracker] = (),
    report_dir: Path | None = None,
) -> None:
    """A one-screen table: rounds, final metrics, wall time, run directory, and where
    the report and the trackers are."""
    final = summary.final
    table = Table(title="fedml run summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("rounds", str(summary.rounds))
    if summary.resumed_from is not None:
        table.add_row("resumed after", f"round {summary.resumed_from}")
    if summary.stop_reason:
        table.add_row("stopped", summary.stop_reason)
    if "discarded" in final:  # the last round changed nothing: report the model kept
        final = next((r for r in reversed(summary.history) if "discarded" not in r), final)
    restored = summary.model_round is not None and summary.model_round != final.get("round")
    if restored:
        table.add_row("model", f"round {summary.model_round} (best, restored)")
        final = next((r for r in summary.history if r["round"] == summary.model_round), final)
    for source, label in (("server", "test (server)"), ("evaluate", "federated eval")):
        metrics = final.get(source)
        if metrics:
            text = f"accuracy {metrics['accuracy']:.4f}  loss {metrics['loss']:.4f}"
            if "auroc" in metrics:
                text += f"  AUROC {metrics['auroc']:.4f}"
            table.add_row(label, text)
    sites = describe_sites(final)
    if sites:
        table.add_row("sites", sites)
    if final.get("train"):
        table.add_row("train loss", f"{final['train']['loss']:.4f}")
    privacy = next((r["privacy"] for r in reversed(summary.history) if r.get("privacy")), None)
    if privacy:
        table.add_row("privacy", describe_privacy(privacy))
    secure = [r for r in summary.history if r.get("secagg")]
    if secure:
        table.add_row("secure aggregation", secure_text(secure))
    wall = f"{summary.seconds:.1f} s"
    if summary.resumed_from is not None:  # this session's, and what the run took in all
        in_rounds = sum(row.get("seconds", 0.0) for row in summary.history)
        wall += f" this session; {in_rounds:.1f} s in the run's rounds"
    table.add_row("wall time", wall)
    table.add_row("run directory", str(summary.run_dir))
    if report_dir is not None:
        table.add_row("report", str(report_dir))
    for tracker in trackers:
        table.add_row(tracker.name, str(tracker.where))
    console.print(table)
