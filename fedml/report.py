"""`fedml report`: plots and CSV tables of one run, or of several overlaid.

A report reads only what a run directory has committed (history rows up to its newest
intact commit, found by `run_status`), so it can be drawn for a finished run, a
resumed one, or one still running. It writes, into one folder:

- `accuracy.png`, `loss.png`: test (server-side, centralized) and federated metrics
  per round, train loss too; one colour per run, one line style per source;
- `clients.png`: clients replied, aggregated, failed and rejected per round, and the
  stragglers, timed-out and declined (privacy budget spent) clients when a run had any:
  a strategy that drops stragglers' partial work shows as fewer aggregated;
- `privacy.png`: epsilon spent per round, when any run used differential privacy;
- `time.png`: wall-clock seconds per round;
- `sites.png`, `sites.csv`: when a run has per-site results, each site's accuracy per
  round (one panel per run; on the sites' own test rows where every site has some, else
  on their validation rows; personal models dashed), and one CSV row per run, round,
  site, model (global or personal) and rows (validation or test) with every metric;
- `summary.csv`: one row per run; `rounds.csv`: one row per run and round with every
  series of `fedml.records.flatten`, the same record the trackers receive.

Matplotlib is imported here only, and draws with its Agg canvas: no display needed.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedml import records
from fedml.data import effective_partition
from fedml.errors import FedmlError
from fedml.monitor import Target
from fedml.runstore import RunStatus, atomic_write, find_runs, run_status, storage_error

if TYPE_CHECKING:  # for type hints only: matplotlib is imported when a report is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100
# Figure name -> size in inches; the PNG is DPI times that in pixels.
SIZES: dict[str, tuple[float, float]] = {
    "accuracy": (8, 5),
    "loss": (8, 5),
    "clients": (8, 9),
    "privacy": (8, 5),
    "time": (8, 4),
    "sites": (8, 4),  # per run drawn
}
SUMMARY_CSV = "summary.csv"
ROUNDS_CSV = "rounds.csv"
SITES_CSV = "sites.csv"
MAX_SITE_PANELS = 6  # runs drawn on sites.png (sites.csv holds every run)
MAX_SITE_LEGEND = 12  # sites named in a panel's legend

# (series, legend text, line style) drawn on the accuracy and loss figures.
ACCURACY_LINES = (
    (records.SERVER_ACCURACY, "test (server)", "-"),
    (records.FEDERATED_ACCURACY, "federated", "--"),
)
LOSS_LINES = (
    (records.SERVER_LOSS, "test (server)", "-"),
    (records.FEDERATED_LOSS, "federated", "--"),
    (records.TRAIN_LOSS, "train", ":"),
)
PRIVACY_LINES = (
    (records.EPSILON_MAX, "max over clients", "-"),
    (records.EPSILON_MEAN, "mean over clients", "--"),
)
CLIENT_PANELS = ("replied", "aggregated", "failed", "rejected")
OCCASIONAL_CLIENT_PANELS = ("stragglers", "timed_out", "declined")  # drawn when nonzero


@dataclass(frozen=True)
class RunSeries:
    """One run's committed rounds, as series keyed like `records.flatten`."""

    label: str
    status: RunStatus
    series: dict[str, dict[int, float]]  # series -> round -> value

    def points(self, name: str) -> tuple[list[int], list[float]]:
        """The rounds that measured `name`, and the values."""
        values = self.series.get(name, {})
        rounds = sorted(values)
        return rounds, [values[r] for r in rounds]

    def last(self, name: str) -> float | None:
        """The value of `name` in the last round that measured it."""
        values = self.series.get(name)
        return values[max(values)] if values else None


@dataclass
class Report:
    """What `write_report` wrote, and the runs it had to leave out (with why)."""

    out: Path
    files: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)  # summary.csv's rows


def load_runs(paths: Sequence[Path]) -> tuple[list[RunSeries], list[str]]:
    """The runs at `paths` (each a run directory or a folder of runs) with at least one
    committed round, and one message per run left out because it has none."""
    found = [run for path in paths for run in find_runs(path)]
    unique = list(dict.fromkeys(p.resolve() for p in found))
    labels = _labels(unique)
    runs, skipped = [], []
    for path in unique:
        status = run_status(path)
        if not status.rows:
            skipped.append(f"{path}: no committed round yet ({status.state}), nothing to plot")
            continue
        series: dict[str, dict[int, float]] = {}
        for row in status.rows:
            for name, value in records.flatten(row).items():
                series.setdefault(name, {})[row["round"]] = value
        runs.append(RunSeries(labels[path], status, series))
    return runs, skipped


def _labels(paths: list[Path]) -> dict[Path, str]:
    """Each run's legend name: its directory name, with as many parents as it takes
    to tell runs apart (runs/a/exp and runs/b/exp become a/exp and b/exp)."""
    depth = 1
    while True:
        labels = {p: "/".join(p.parts[-depth:]) for p in paths}
        if len(set(labels.values())) == len(paths) or depth >= max(len(p.parts) for p in paths):
            return labels
        depth += 1


def figures(runs: Sequence[RunSeries]) -> dict[str, Figure]:
    """The report's figures by name (see `SIZES`); privacy only when a run has it."""
    drawn = {
        "accuracy": _line_figure(runs, "accuracy", ACCURACY_LINES, "accuracy"),
        "loss": _line_figure(runs, "loss", LOSS_LINES, "loss"),
        "clients": _clients_figure(runs),
        "time": _line_figure(
            runs, "time", ((records.SECONDS, "", "-"),), "seconds per round", from_zero=True
        ),
    }
    if any(records.EPSILON_MAX in run.series for run in runs):
        drawn["privacy"] = _line_figure(
            runs, "privacy", PRIVACY_LINES, "epsilon spent", from_zero=True
        )
    with_sites = [run for run in runs if any(row.get("sites") for row in run.status.rows)]
    if with_sites:
        drawn["sites"] = _sites_figure(with_sites[:MAX_SITE_PANELS])
    return drawn


def _sites_figure(runs: Sequence[RunSeries]) -> Figure:
    """Each site's accuracy per round, one panel per run: the global model solid, the
    site's personal model dashed (one colour per site, the same in every panel)."""
    names = list(dict.fromkeys(name for run in runs for name in _site_names(run)))
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    figure, axes = _new_figure("sites", len(runs), grow=True)
    for ax, run in zip(axes, runs, strict=True):
        last = next(row for row in reversed(run.status.rows) if row.get("sites"))
        split = records.site_accuracies(last)[0]
        for name in _site_names(run):
            for model, style in (("global", "-"), ("personal", "--")):
                rounds, values = _site_points(run, name, model, split)
                if rounds:
                    label = name if model == "global" else f"{name} (personal)"
                    ax.plot(rounds, values, style, color=colours[name], marker=".", label=label)
        rows = "own test rows" if split == "test" else "validation rows"
        ax.set_ylabel(f"accuracy ({rows})")
        if len(runs) > 1:
            ax.set_title(run.label, fontsize="small")
        if len(_site_names(run)) <= MAX_SITE_LEGEND:
            _legend_or_note(ax)
    return figure


def _site_names(run: RunSeries) -> list[str]:
    return list(dict.fromkeys(name for row in run.status.rows for name in row.get("sites") or {}))


def _site_points(
    run: RunSeries, name: str, model: str, split: str
) -> tuple[list[int], list[float]]:
    """(rounds, accuracies) of site `name`'s global or personal model on `split`."""
    points = []
    for row in run.status.rows:
        entry = (row.get("sites") or {}).get(name, {})
        measured = (entry.get("personal", {}) if model == "personal" else entry).get(split, {})
        value = measured.get("accuracy")
        if isinstance(value, int | float) and math.isfinite(value):
            points.append((row["round"], float(value)))
    return [r for r, _ in points], [v for _, v in points]


def site_rows(runs: Sequence[RunSeries]) -> list[dict[str, Any]]:
    """sites.csv: one row per run, round, site, model and rows, with every metric."""
    table = []
    for run in runs:
        for row in run.status.rows:
            for name, entry in (row.get("sites") or {}).items():
                for model, results in (("global", entry), ("personal", entry.get("personal"))):
                    for split in ("validation", "test"):
                        metrics = (results or {}).get(split)
                        if metrics:
                            table.append(
                                {"run": run.label, "round": row["round"], "site": name,
                                 "model": model, "rows": split, **metrics}
                            )  # fmt: skip
    columns = list(dict.fromkeys(key for line in table for key in line))
    return [{key: line.get(key, "") for key in columns} for line in table]


def _new_figure(name: str, panels: int = 1, grow: bool = False) -> tuple[Figure, list[Axes]]:
    """A figure of `SIZES[name]`; with `grow` that height per panel."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    width, height = SIZES[name]
    size = (width, height * panels) if grow else (width, height)
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    axes = figure.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("round")
    return figure, list(axes)


def _line_figure(
    runs: Sequence[RunSeries],
    name: str,
    lines: Sequence[tuple[str, str, str]],
    ylabel: str,
    from_zero: bool = False,
) -> Figure:
    figure, (ax,) = _new_figure(name)
    for colour, run in _coloured(runs):
        for series, text, style in lines:
            rounds, values = run.points(series)
            if rounds:
                label = _legend(run.label, text, len(runs))
                ax.plot(rounds, values, style, color=colour, marker=".", label=label)
    ax.set_ylabel(ylabel)
    if from_zero:  # a total that grows from nothing (epsilon), or a duration
        ax.set_ylim(bottom=0)
    _legend_or_note(ax)
    return figure


def _clients_figure(runs: Sequence[RunSeries]) -> Figure:
    from matplotlib.ticker import MaxNLocator

    panels = list(CLIENT_PANELS) + [
        panel
        for panel in OCCASIONAL_CLIENT_PANELS
        if any(any(run.points(f"clients/{panel}")[1]) for run in runs)
    ]
    figure, axes = _new_figure("clients", len(panels))
    for ax, panel in zip(axes, panels, strict=True):
        for colour, run in _coloured(runs):
            rounds, values = run.points(f"clients/{panel}")
            if rounds:
                ax.plot(rounds, values, "-", color=colour, marker=".", label=run.label)
        ax.set_ylabel(f"clients {panel.replace('_', ' ')}")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0, top=max(1.0, ax.get_ylim()[1]))  # counts: from 0, at least 1
    _legend_or_note(axes[0])
    return figure


def _coloured(runs: Sequence[RunSeries]) -> list[tuple[str, RunSeries]]:
    """One colour per run, the same on every figure."""
    return [(f"C{i % 10}", run) for i, run in enumerate(runs)]


def _legend(run: str, text: str, run_count: int) -> str:
    if run_count == 1:
        return text or run
    return f"{run}: {text}" if text else run


def _legend_or_note(ax: Axes) -> None:
    if ax.get_lines():
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)


def write_report(paths: Sequence[Path], out: Path) -> Report:
    """Draw the figures and write the CSV files for the runs at `paths` into `out`."""
    runs, skipped = load_runs(paths)
    if not runs:
        raise FedmlError(
            "Nothing to report: " + "; ".join(skipped) + ". Report a run once it has "
            "committed a round (`fedml runs` shows how far each run is)."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FedmlError(f"Cannot create the report folder {out}: {exc}.") from exc
    report = Report(out, skipped=skipped)
    # The whole report or none of it: every file is written into a staging folder
    # inside `out` first, then renamed into place (a rename allocates nothing), so a
    # full disk leaves the previous report as it was, not half of a new one.
    try:
        staging = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
        try:
            staged = []
            for name, figure in figures(runs).items():
                image = io.BytesIO()
                figure.savefig(image, dpi=DPI, format="png")
                staged.append(_write(staging / f"{name}.png", image.getvalue()))
            report.summary = [summary_row(run) for run in runs]
            staged.append(_write_csv(staging / SUMMARY_CSV, report.summary))
            staged.append(_write_csv(staging / ROUNDS_CSV, _round_rows(runs)))
            sites = site_rows(runs)
            if sites:
                staged.append(_write_csv(staging / SITES_CSV, sites))
            for path in staged:
                os.replace(path, out / path.name)
                report.files.append(out / path.name)
            # what an earlier report wrote and this one does not
            for stale in [*(f"{name}.png" for name in SIZES), SITES_CSV]:
                if out / stale not in report.files:
                    (out / stale).unlink(missing_ok=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise storage_error(exc, f"writing the report to {out}") from exc
    return report


def _site_columns(rows: list) -> dict[str, Any]:
    """The last per-site results: the sites' mean accuracy and the worst site (on their
    own test rows where every site has some, else on their validation rows)."""
    last = next((row for row in reversed(rows) if row.get("sites")), None)
    split, accuracies = records.site_accuracies(last) if last else ("", {})
    if not accuracies:
        return {
            "sites_on": "",
            "sites_mean_accuracy": "",
            "worst_site": "",
            "worst_site_accuracy": "",
        }
    worst = min(accuracies, key=lambda name: accuracies[name])
    return {
        "sites_on": split,
        "sites_mean_accuracy": _cell(sum(accuracies.values()) / len(accuracies)),
        "worst_site": worst,
        "worst_site_accuracy": _cell(accuracies[worst]),
    }


def summary_row(run: RunSeries) -> dict[str, Any]:
    """One run's line of summary.csv: what ran, how far, how it ended, how well.
    The `last_*` columns are each metric's value in the last round that measured it."""
    status, cfg = run.status, run.status.cfg
    best = status.best
    best_value = None
    if best is not None and status.best_metric:
        group, _, metric = status.best_metric.partition(".")
        best_value = best[group][metric]
    return {
        "run": run.label,
        "path": str(status.path),
        "status": status.state,
        "strategy": cfg.strategy.name,
        "model": cfg.model.name,
        "dataset": cfg.data.dataset,
        "partition": effective_partition(cfg.data.dataset, cfg.data.partition),
        "clients": cfg.simulation.clients,
        "seed": cfg.seed,
        "dp": cfg.dp.mode,
        "secagg": cfg.secagg.enabled,
        "masked_updates": records.masked_updates(run.status.rows),
        "local_epochs": cfg.client.local_epochs,
        "batch_size": cfg.client.batch_size,
        "fraction_train": cfg.strategy.fraction_train,
        "rounds": status.rounds_done,
        "stop_reason": status.stop_reason or "",
        "best_round": best["round"] if best else "",
        "best_metric": status.best_metric or "",
        "best_value": _cell(best_value),
        "target": cfg.stop.target,
        "target_round": _cell(target_round(status)),
        "last_test_accuracy": _cell(run.last(records.SERVER_ACCURACY)),
        "last_test_loss": _cell(run.last(records.SERVER_LOSS)),
        "last_federated_accuracy": _cell(run.last(records.FEDERATED_ACCURACY)),
        "last_federated_loss": _cell(run.last(records.FEDERATED_LOSS)),
        "last_train_loss": _cell(run.last(records.TRAIN_LOSS)),
        **_site_columns(run.status.rows),
        "epsilon": _cell(run.last(records.EPSILON_MAX)),
        "seconds": _cell(math.fsum(run.series.get(records.SECONDS, {}).values())),
    }


def target_round(status: RunStatus) -> int | None:
    """The first committed round that met the run's `stop.target` (the FedAvg paper's
    "rounds to reach a target accuracy"), or None (no target, or not reached)."""
    if not status.cfg.stop.target:
        return None
    target = Target.parse(status.cfg.stop.target)
    return next((row["round"] for row in status.rows if target.reached(row)), None)


def _round_rows(runs: Sequence[RunSeries]) -> list[dict[str, Any]]:
    names = sorted({name for run in runs for name in run.series})
    return [
        {"run": run.label, "round": row["round"]}
        | {name: _cell(run.series.get(name, {}).get(row["round"])) for name in names}
        for run in runs
        for row in run.status.rows
    ]


def _cell(value: float | None) -> str | float:
    return "" if value is None else value


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return _write(path, text.getvalue().encode("utf-8"))


def _write(path: Path, data: bytes) -> Path:
    atomic_write(path, data)
    return path
