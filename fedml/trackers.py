"""Experiment trackers: TensorBoard scalars and MLflow metrics, fed round by round.

Each tracker receives every committed history row (the `on_round` callback of the
round loop, which runs after the commit) as the flat series of
`fedml.records.flatten`, at step = round. The package behind a tracker is imported
only when that tracker is asked for, and a missing one is a clear error before the
run starts.

A tracker shows exactly the committed history, also across resumes: before its first
row it catches up on the committed rows it has not seen (those the run directory's
history holds before that row). TensorBoard first hides whatever an interrupted
session had logged from round 1 on (`SummaryWriter(purge_step=1)`), then logs the
history again; MLflow continues the MLflow run tagged with the run directory and logs
the rounds after the last one it holds.

A tracker that fails while the run goes (a full disk, a locked database) is switched
off with a warning: losing a chart is no reason to lose a training run, and the
history in the run directory still holds everything (`fedml report` redraws it).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from fedml.config import RunConfig
from fedml.errors import FedmlError
from fedml.records import SECONDS, HistoryRow, flatten
from fedml.runstore import read_history

log = logging.getLogger(__name__)

MLFLOW_EXPERIMENT = "fedml"
RUN_DIR_TAG = "fedml.run_dir"


class Tracker(Protocol):
    """Something that records a run's rounds elsewhere."""

    name: str
    where: Any  # where it records: shown in the run summary

    def log_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        """Record committed history rows (in round order)."""

    def close(self) -> None:
        """Flush and release; the run has ended."""


class Trackers:
    """The trackers of one run: catch-up before the first row, fan-out, failure
    isolation. Call it with each committed row (it is an `on_round` callback)."""

    def __init__(self, run_dir: Path, trackers: Sequence[Tracker]) -> None:
        self.run_dir = run_dir
        self.active = list(trackers)
        self._caught_up = False

    def __call__(self, row: HistoryRow) -> None:
        rows = [row]
        if not self._caught_up:
            earlier = read_history(self.run_dir)
            rows = [r for r in earlier if r["round"] < row["round"]] + rows
            self._caught_up = True
        for tracker in list(self.active):
            try:
                tracker.log_rows(rows)
            except Exception as exc:  # any tracker failure: warn, go on
                self._switch_off(tracker, exc)

    def close(self) -> None:
        for tracker in list(self.active):
            try:
                tracker.close()
            except Exception as exc:  # as above
                self._switch_off(tracker, exc)

    def _switch_off(self, tracker: Tracker, exc: Exception) -> None:
        log.warning(
            "%s stopped recording this run (%s: %s). The run goes on; its history is in "
            "%s, and `fedml report %s` draws it.",
            tracker.name,
            type(exc).__name__,
            exc,
            self.run_dir,
            self.run_dir,
        )
        self.active.remove(tracker)


class TensorBoardTracker:
    """Scalars in `log_dir/<run directory name>`, one tag per series (`server/accuracy`,
    `clients/failed`, ...). View with `tensorboard --logdir log_dir`."""

    name = "TensorBoard"

    def __init__(self, log_dir: Path, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise FedmlError(
                "--tensorboard needs the tensorboard package, which is not installed: "
                "pip install tensorboard (or fedml-sites[tensorboard])."
            ) from exc
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FedmlError(f"Cannot write TensorBoard logs to {log_dir}: {exc}.") from exc
        self.where = log_dir / run_dir.name
        self._writer_class = SummaryWriter
        self.writer: Any = None  # opened with the first rows: no empty logs for a failed start

    def log_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        if self.writer is None:
            # purge_step=1: the history is logged again from round 1 (see the module doc)
            self.writer = self._writer_class(log_dir=str(self.where), purge_step=1)
        for row in rows:
            for name, value in flatten(row).items():
                self.writer.add_scalar(name, value, global_step=row["round"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that does not answer is an error now, in seconds: MLflow's own
    client would retry for minutes before saying so."""
    import urllib.request

    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError as exc:
        raise FedmlError(f"--mlflow {uri}: {exc}.") from exc
    proxied = parsed.scheme in urllib.request.getproxies()
    if proxied and not urllib.request.proxy_bypass(parsed.hostname):
        return  # reached through a proxy: MLflow's client will say what it finds
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise FedmlError(
            f"Cannot reach the MLflow tracking server at {uri}: {exc}. Start it, or record "
            "to a SQLite file instead (--mlflow mlflow.db)."
        ) from exc


class MLflowTracker:
    """One MLflow run per run directory, in the experiment "fedml": the config as
    params (what a resume changes, as tags "resumed.<key>"), the series as metrics.
    `store` is a SQLite file (created when missing) or a tracking URI. View with
    `mlflow ui --backend-store-uri sqlite:///PATH`."""

    name = "MLflow"

    def __init__(self, store: str, run_dir: Path, cfg: RunConfig) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise FedmlError(
                "--mlflow needs the mlflow package, which is not installed: pip install "
                "mlflow-skinny (or fedml-sites[mlflow])."
            ) from exc
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.where = tracking_uri(store)
        self.run_dir, self.cfg = run_dir, cfg
        self.run_id: str | None = None  # opened with the first rows (see TensorBoardTracker)
        self.last_round = 0
        _check_reachable(self.where)
        try:  # reach the store now, so that a wrong one is an error before the run
            self.client = MlflowClient(tracking_uri=self.where)
            experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
            self.experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self.client.create_experiment(MLFLOW_EXPERIMENT)
            )
        except Exception as exc:  # MLflow raises many types
            raise FedmlError(
                f"Cannot record to MLflow at {self.where}: {type(exc).__name__}: {exc}. Pass "
                "a writable SQLite file (--mlflow mlflow.db) or a reachable tracking URI."
            ) from exc

    def _open_run(self) -> None:
        """Continue the MLflow run of this run directory after the last round it holds,
        or start one with the config as params."""
        from mlflow.entities import Param

        key = str(self.run_dir.resolve())
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{_quoted(key)}'"
        )
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            # params cannot change in MLflow: what a resume changed (more rounds, more
            # time, another device) becomes a tag "resumed.<key>"
            logged = found[0].data.params
            for k, v in sorted(self.cfg.to_flat().items()):
                if k in logged and logged[k] != str(v):
                    self.client.set_tag(self.run_id, f"resumed.{k}", str(v))
            steps = [m.step for m in self.client.get_metric_history(self.run_id, SECONDS)]
            self.last_round = max(steps, default=0)
            return
        run = self.client.create_run(
            self.experiment_id, run_name=self.run_dir.name, tags={RUN_DIR_TAG: key}
        )
        self.run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in sorted(self.cfg.to_flat().items())]
        for start in range(0, len(params), 100):  # MLflow takes 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            self._open_run()
        now = int(time.time() * 1000)
        for row in rows:
            if row["round"] <= self.last_round:
                continue  # recorded by an earlier session of this run
            metrics = [Metric(k, float(v), now, row["round"]) for k, v in flatten(row).items()]
            for start in range(0, len(metrics), 1000):  # MLflow takes 1,000 metrics per batch
                self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])
            self.last_round = row["round"]

    def close(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)


def tracking_uri(store: str) -> str:
    """A tracking URI as given (`sqlite:///...`, `http://...`), else a SQLite file path."""
    if "://" in store or store.startswith("sqlite:"):
        return store
    return f"sqlite:///{Path(store).resolve()}"


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")
