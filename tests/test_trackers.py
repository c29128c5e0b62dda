"""TensorBoard and MLflow trackers: what they record, across a resume, and on failure."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from fedml import records
from fedml.config import load_config
from fedml.errors import FedmlError
from fedml.runstore import open_resume
from fedml.trackers import MLFLOW_EXPERIMENT, MLflowTracker, TensorBoardTracker, Trackers
from simulations.engine import simulate


def _config(out: Path, rounds: int):
    overrides = {"rounds": rounds, "simulation.clients": 4, "client.local_epochs": 1}
    return load_config(None, overrides | {"out": str(out)})


def _run(cfg, trackers: Trackers, resume=None) -> list[dict]:
    try:
        return simulate(cfg, on_round=trackers, resume=resume).history
    finally:
        trackers.close()


def _tensorboard_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        events = EventAccumulator(str(log_dir))
        events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def _mlflow_runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    return client, client.search_runs([experiment.experiment_id])


def _float32(value: float) -> float:
    import numpy as np

    return float(np.float32(value))  # TensorBoard stores scalars as float32


def test_tensorboard_holds_every_series_once_per_round_also_after_a_resume(tmp_path):
    out, logs = tmp_path / "run", tmp_path / "tb"
    cfg = _config(out, rounds=2)
    _run(cfg, Trackers(out, [TensorBoardTracker(logs, out)]))
    store, cfg = open_resume(out, {"rounds": 4})
    history = _run(cfg, Trackers(out, [TensorBoardTracker(logs, out)]), resume=store)
    assert [row["round"] for row in history] == [1, 2, 3, 4]
    for tag in (records.SERVER_ACCURACY, records.TRAIN_LOSS, "clients/replied"):
        expected = [(row["round"], _float32(records.flatten(row)[tag])) for row in history]
        assert _tensorboard_scalars(logs / "run", tag) == expected


def test_tensorboard_after_a_crash_shows_the_committed_history_not_the_lost_round(tmp_path):
    """An interrupted session logged round 3, which no commit holds; the resumed one
    replays round 3 with other values. TensorBoard must show the resumed values."""
    out, logs = tmp_path / "run", tmp_path / "tb"
    history = _run(_config(out, rounds=2), Trackers(out, [TensorBoardTracker(logs, out)]))
    lost = TensorBoardTracker(logs, out)
    lost.log_rows([{**history[-1], "round": 3, "server": {"accuracy": -1.0, "loss": 9.0}}])
    lost.close()
    store, cfg = open_resume(out, {"rounds": 3})
    history = _run(cfg, Trackers(out, [TensorBoardTracker(logs, out)]), resume=store)
    expected = [(row["round"], _float32(row["server"]["accuracy"])) for row in history]
    assert _tensorboard_scalars(logs / "run", records.SERVER_ACCURACY) == expected


def test_mlflow_records_params_and_metrics_and_a_resume_continues_the_same_run(tmp_path):
    out, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _config(out, rounds=2)
    _run(cfg, Trackers(out, [MLflowTracker(str(tmp_path / "mlflow.db"), out, cfg)]))
    store, cfg = open_resume(out, {"rounds": 3})
    history = _run(cfg, Trackers(out, [MLflowTracker(uri, out, cfg)]), resume=store)
    client, runs = _mlflow_runs(uri)
    (run,) = runs  # the resume continued the run rather than starting another
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["strategy.name"] == "fedavg"
    assert run.data.params["rounds"] == "2"  # MLflow params are fixed once logged
    assert run.data.tags["resumed.rounds"] == "3"
    for key in (records.SERVER_ACCURACY, records.FEDERATED_LOSS, records.SECONDS):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert logged == [(row["round"], records.flatten(row)[key]) for row in history]


def test_a_tracker_attached_on_resume_catches_up_on_the_earlier_rounds(tmp_path):
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    _run(_config(out, rounds=2), Trackers(out, []))
    store, cfg = open_resume(out, {"rounds": 3})
    history = _run(cfg, Trackers(out, [MLflowTracker(str(db), out, cfg)]), resume=store)
    client, (run,) = _mlflow_runs(f"sqlite:///{db}")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, records.SERVER_ACCURACY)]
    assert sorted(steps) == [row["round"] for row in history] == [1, 2, 3]


class _Broken:
    name, where = "Broken", "nowhere"

    def __init__(self) -> None:
        self.closed = False

    def log_rows(self, rows):
        raise OSError("disk full")

    def close(self):
        self.closed = True


class _Recorder:
    name, where = "Recorder", "memory"

    def __init__(self) -> None:
        self.rounds: list[int] = []

    def log_rows(self, rows):
        self.rounds += [row["round"] for row in rows]

    def close(self):
        pass


def test_a_failing_tracker_is_switched_off_with_a_warning_and_the_run_goes_on(tmp_path, caplog):
    out = tmp_path / "run"
    broken, recorder = _Broken(), _Recorder()
    trackers = Trackers(out, [broken, recorder])
    with caplog.at_level(logging.WARNING, logger="fedml.trackers"):
        history = _run(_config(out, rounds=3), trackers)
    assert len(history) == 3 and recorder.rounds == [1, 2, 3]
    assert trackers.active == [recorder] and not broken.closed
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "Broken stopped recording" in warning and "disk full" in warning
    assert f"fedml report {out}" in warning


def test_a_missing_tracker_package_is_a_clear_error_before_the_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(FedmlError, match="--tensorboard needs the tensorboard package"):
        TensorBoardTracker(tmp_path / "tb", tmp_path / "run")
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(FedmlError, match="--mlflow needs the mlflow package"):
        MLflowTracker("mlflow.db", tmp_path / "run", _config(tmp_path / "run", 1))


def test_an_unusable_mlflow_store_is_a_clear_error_before_the_run(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    db = tmp_path / "a-file" / "mlflow.db"
    with pytest.raises(FedmlError, match="Cannot record to MLflow at sqlite:///"):
        MLflowTracker(str(db), tmp_path / "run", _config(tmp_path / "run", 1))


def test_an_mlflow_server_that_does_not_answer_is_an_error_in_seconds(tmp_path):
    """MLflow's client would retry for over four minutes before saying so."""
    from fedml.deploy.processes import free_port

    started = time.monotonic()
    with pytest.raises(FedmlError, match="Cannot reach the MLflow tracking server"):
        MLflowTracker(
            f"http://127.0.0.1:{free_port()}/", tmp_path / "run", _config(tmp_path / "run", 1)
        )
    assert time.monotonic() - started < 15


def test_the_cli_imports_tracker_packages_only_when_asked_and_matplotlib_only_to_report(
    tmp_path,
):
    code = (
        "import sys; from fedml.cli import app; "
        "args = ['simulate', '--rounds', '1', '--clients', '2', '--local-epochs', '1', "
        f"'--no-report', '--out', {str(tmp_path / 'run')!r}]; "
        "app(args, standalone_mode=False); "
        "loaded = [m for m in ('mlflow', 'tensorboard', 'torch.utils.tensorboard', "
        "'matplotlib') if m in sys.modules]; "
        "print('loaded:', loaded)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert "loaded: []" in result.stdout, result.stdout + result.stderr
