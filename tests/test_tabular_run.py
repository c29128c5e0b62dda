"""Raw tables from several sources through whole runs: the sites' statistics gathered
before round 1, committed and resumed, applied at every site and on the server's test
set; missing values imputed; `csv:DIR` federations; what a hostile statistics reply
does; the runs that do not standardise and why."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import app as fedml_client
from fedml.config import load_config
from fedml.data.heart import read_hospitals
from fedml.errors import FedmlError
from fedml.preprocessing import FeatureScaling
from fedml.runstore import RunStore, open_resume
from fedml.server import Experiment, run_experiment
from simulations.engine import simulate
from simulations.inprocess import InProcessGrid


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def _scaling_state(run) -> dict:
    """The run's committed standardisation, as a resumed run gets it back."""
    store, cfg = open_resume(run, {})
    try:
        checkpoint, _ = store.resume(cfg)
    finally:
        store.close()
    return checkpoint.state["scaling"]


def _training_rows(cfg) -> np.ndarray:
    """Every simulated client's training rows (after its validation split), pooled."""
    return np.concatenate(
        [fedml_client.LocalJob.load(cfg, pid).train.x for pid in range(cfg.simulation.clients)]
    )


def test_raw_hospital_tables_train_with_the_defaults_and_not_without_standardisation(tmp_path):
    """fed-heart-disease's raw rows (age ~50, cholesterol ~240): with the defaults the
    four hospitals' statistics standardise them and a logistic regression learns; with
    data.preprocess = 'none' it stays near the majority class and the run says why."""
    common = {"data.dataset": "fed-heart-disease", "model.name": "logreg", "rounds": 8}
    cfg = load_config(None, {**common, "out": str(tmp_path / "auto")})
    standardised = simulate(cfg)
    rows = _rows(tmp_path / "auto")
    assert rows[0]["preprocess"] == {"standardized": 13, "sites": 4, "rows": 389}
    assert all("preprocess" not in row for row in rows[1:])
    pooled = _training_rows(cfg).astype(np.float64)
    state = _scaling_state(tmp_path / "auto")
    assert state["sites"] == 4 and state["rows"] == len(pooled) == 389
    np.testing.assert_allclose(state["mean"], pooled.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(state["scale"], pooled.std(axis=0), rtol=1e-6)
    assert standardised.final["server"]["accuracy"] >= 0.74

    raw = simulate(
        load_config(None, {**common, "data.preprocess": "none", "out": str(tmp_path / "raw")})
    )
    assert raw.final["server"]["accuracy"] <= 0.70
    assert "preprocess" not in _rows(tmp_path / "raw")[0]
    assert standardised.final["server"]["accuracy"] - raw.final["server"]["accuracy"] >= 0.1


def test_the_committed_statistics_are_the_pooled_training_rows_and_a_resume_never_asks_again(
    tmp_path, monkeypatch
):
    overrides = {
        "data.dataset": "breast-cancer",
        "simulation.clients": 4,
        "out": str(tmp_path / "run"),
    }
    cfg = load_config(None, {**overrides, "rounds": 2})
    simulate(cfg)
    state = _scaling_state(tmp_path / "run")
    pooled = _training_rows(cfg).astype(np.float64)
    np.testing.assert_allclose(state["mean"], pooled.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(state["scale"], pooled.std(axis=0), rtol=1e-6)

    def never(*args, **kwargs):
        raise AssertionError("a resumed run asked the sites for their statistics again")

    monkeypatch.setattr(FeatureScaling, "gather", never)
    store, cfg = open_resume(tmp_path / "run", {"rounds": 4})
    summary = simulate(cfg, resume=store)
    assert summary.resumed_from == 2 and summary.rounds == 4


def _write_site_csv(path, x: np.ndarray, y: np.ndarray, columns: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*columns, "outcome"])
        for features, label in zip(x, y, strict=True):
            writer.writerow([("" if np.isnan(v) else f"{v:g}") for v in features] + [int(label)])


COLUMNS = ["age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak"]
COLUMNS += ["cp2", "cp3", "cp4", "restecg1", "restecg2"]


@pytest.fixture
def hospital_csvs(tmp_path):
    """The four hospitals as their own raw CSV files (label column 'outcome'), with a
    tenth of Cleveland's cholesterol values and some ages at Hungary missing."""
    folder = tmp_path / "hospitals"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for hospital in read_hospitals():
        x = hospital.train.x.astype(np.float64)
        if hospital.name == "cleveland":
            x[rng.random(len(x)) < 0.1, 3] = np.nan
        if hospital.name == "hungary":
            x[:7, 0] = np.nan
        _write_site_csv(folder / f"{hospital.name}.csv", x, hospital.train.y, COLUMNS)
    test = [h.test for h in read_hospitals()]
    _write_site_csv(
        folder / "test.csv",
        np.concatenate([t.x for t in test]),
        np.concatenate([t.y for t in test]),
        COLUMNS,
    )
    return folder


def test_a_folder_of_hospital_csvs_with_gaps_trains_and_the_gaps_become_the_mean(
    tmp_path, hospital_csvs
):
    overrides = {
        "data.dataset": f"csv:{hospital_csvs}",
        "data.label_column": "outcome",
        "model.name": "logreg",
        "rounds": 6,
        "out": str(tmp_path / "run"),
    }
    cfg = load_config(None, overrides)
    assert cfg.simulation.clients == 4  # one per site file; test.csv is the server's
    summary = simulate(cfg)
    assert summary.final["server"]["accuracy"] >= 0.72
    pooled = _training_rows(cfg).astype(np.float64)
    assert np.isnan(pooled[:, 3]).sum() > 5 and np.isnan(pooled[:, 0]).sum() > 0
    assert _scaling_state(tmp_path / "run")["rows"] == len(pooled)

    with pytest.raises(FedmlError, match=r"missing values \(NaN\).*data.preprocess"):
        Experiment.prepare(load_config(None, {**overrides, "data.preprocess": "none"}))


def test_a_csv_folder_without_test_csv_holds_out_each_sites_rows(tmp_path, hospital_csvs):
    (hospital_csvs / "test.csv").unlink()
    cfg = load_config(
        None,
        {"data.dataset": f"csv:{hospital_csvs}", "data.label_column": "outcome", "seed": 3},
    )
    from fedml.data import federation_for

    federation = federation_for(cfg)
    assert federation.names == ("cleveland", "hungary", "switzerland", "va-long-beach")
    sizes = [len(federation.client(i)) for i in range(4)]
    held_out = [199 - sizes[0], 172 - sizes[1], 30 - sizes[2], 85 - sizes[3]]
    assert held_out == [40, 34, 6, 17] and len(federation.test) == sum(held_out)


@pytest.mark.parametrize(
    ("files", "fragment"),
    [
        (
            {"a.csv": "x,label\n1,0\n2,1\n", "b.csv": "x,y,label\n1,2,0\n"},
            "every site needs the same columns",
        ),
        (
            {"a.csv": "x,y,label\n1,2,0\n", "b.csv": "y,x,label\n1,2,0\n"},
            "b.csv has the feature columns y, x",
        ),
        ({"a.csv": "x,x,label\n1,2,0\n"}, "names column.*more than once"),
        ({"a.csv": "x,label\n1,0\n,1\n", "b.csv": "x,label\n1,inf\n"}, "b.csv, line 2: 'inf'"),
        ({"a.csv": "x,label\n1,0.5\n"}, "label '0.5' is not a class index"),
        ({"a.csv": "x,label\n1,\n"}, "the label is missing"),
        ({"a.csv": "x,label\nlots,1\n"}, r"'lots' \(column 'x'\) is not a number"),
        ({"a.csv": "x,label\n1e39,1\n"}, "not a finite number a float32 can hold"),
    ],
)
def test_a_bad_site_csv_is_one_clear_error_naming_file_and_line(tmp_path, files, fragment):
    (tmp_path / "z.csv").write_text("x,label\n1,0\n2,1\n")  # a good site beside them
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    cfg = load_config(None, {"data.dataset": f"csv:{tmp_path}"})
    from fedml.data import federation_for

    with pytest.raises(FedmlError, match=fragment):
        federation_for(cfg)


def test_an_npz_folder_of_csv_files_is_told_what_it_holds(tmp_path, hospital_csvs):
    with pytest.raises(FedmlError, match="holds shards none"):
        from fedml.data import federation_for

        federation_for(load_config(None, {"data.dataset": f"npz:{hospital_csvs}"}))


def _app_with_a_broken_site(broken_node: int) -> ClientApp:
    """fedml's ClientApp, except that node `broken_node` sends statistics claiming a
    huge mean with sums of squares that no real values give."""
    app = ClientApp()

    @app.query("feature_stats")
    def stats(msg: Message, context) -> Message:
        if context.node_id != broken_node:
            return fedml_client.feature_stats(msg, context)
        metrics = {"rows": 10, "observed": [10] * 30, "sums": [1e9] * 30, "squares": [1.0] * 30}
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    app.train()(fedml_client.train)
    app.evaluate()(fedml_client.evaluate_global)
    return app


def test_a_site_sending_impossible_statistics_is_left_out_and_named(tmp_path, caplog):
    cfg = load_config(
        None,
        {
            "data.dataset": "breast-cancer",
            "simulation.clients": 3,
            "rounds": 1,
            "out": str(tmp_path / "r"),
        },
    )
    grid = InProcessGrid(_app_with_a_broken_site(2), 3, cfg.to_flat())
    with caplog.at_level(logging.WARNING, logger="fedml.preprocessing"):
        summary = run_experiment(
            grid, Experiment.prepare(cfg), RunStore.create(tmp_path / "r", cfg)
        )
    assert summary.history[0]["preprocess"]["sites"] == 2
    assert "node 2: the sums and sums of squares cannot come from real values" in caplog.text
    assert summary.final["server"]["accuracy"] > 0.8  # the lie did not reach the scaling


def test_no_usable_statistics_stop_the_run_before_training_with_the_sites_reasons(tmp_path):
    cfg = load_config(
        None,
        {"data.dataset": "breast-cancer", "simulation.clients": 1, "strategy.min_train_clients": 1,
         "strategy.min_evaluate_clients": 1, "rounds": 1, "out": str(tmp_path / "r")},
    )  # fmt: skip
    grid = InProcessGrid(_app_with_a_broken_site(1), 1, cfg.to_flat())
    with pytest.raises(FedmlError, match=r"0 site\(s\) sent usable feature statistics.*node 1"):
        run_experiment(grid, Experiment.prepare(cfg), RunStore.create(tmp_path / "r", cfg))


def test_which_runs_standardise(caplog):
    def standardises(**overrides) -> bool:
        return Experiment.prepare(load_config(None, overrides)).standardize

    assert standardises(**{"data.dataset": "breast-cancer"})
    assert standardises(**{"data.dataset": "fed-heart-disease"})
    assert not standardises(**{"data.dataset": "digits"})  # images keep their pixels
    assert not standardises(**{"data.dataset": "synthetic"})  # the paper's features as drawn
    with caplog.at_level(logging.WARNING, logger="fedml.preprocessing"):
        assert not standardises(**{"data.dataset": "fed-heart-disease", "data.preprocess": "none"})
    assert "4 of 13 features look unscaled (feature chol: mean 221" in caplog.text
    # under secure aggregation too: the sites' statistics are summed masked
    assert standardises(**{"data.dataset": "breast-cancer", "secagg.enabled": True})
    secure_and_asked = {"secagg.enabled": True, "data.preprocess": "standardize"}
    assert standardises(**{"data.dataset": "breast-cancer", **secure_and_asked})
    with pytest.raises(FedmlError, match=r"needs tabular examples.*shape \(1, 8, 8\)"):
        standardises(**{"data.dataset": "digits", "data.preprocess": "standardize"})
    with pytest.raises(FedmlError, match=r"data\.preprocess 'zscore' is unknown"):
        load_config(None, {"data.preprocess": "zscore"})


def test_fewer_sites_with_statistics_than_the_run_needs_stop_it_before_training(tmp_path):
    cfg = load_config(
        None,
        {"data.dataset": "breast-cancer", "simulation.clients": 3, "rounds": 1,
         "out": str(tmp_path / "r")},
    )  # fmt: skip

    app = ClientApp()

    @app.query("feature_stats")
    def stats(msg: Message, context) -> Message:
        if context.node_id == 1:
            return fedml_client.feature_stats(msg, context)
        raise RuntimeError("this site's statistics failed")

    grid = InProcessGrid(app, 3, cfg.to_flat())
    with pytest.raises(FedmlError, match=r"1 site\(s\) sent usable feature statistics.*fewer"):
        run_experiment(grid, Experiment.prepare(cfg), RunStore.create(tmp_path / "r", cfg))


def test_a_run_whose_commits_hold_no_statistics_keeps_its_raw_features(tmp_path, caplog):
    """A run made before fedml standardised reads as data.preprocess = 'auto' when
    resumed (its config has no such key); its committed rounds trained on raw features,
    so it keeps them rather than gathering statistics mid-run."""
    import dataclasses

    from fedml.config import with_overrides

    overrides = {"data.dataset": "breast-cancer", "simulation.clients": 3, "rounds": 2}
    simulate(
        load_config(None, {**overrides, "data.preprocess": "none", "out": str(tmp_path / "r")})
    )
    store, cfg = open_resume(tmp_path / "r", {"rounds": 3})
    checkpoint, _ = store.resume(cfg)
    as_read_now = with_overrides(cfg, {"data.preprocess": "auto"})  # the old config's reading
    experiment = Experiment.prepare(as_read_now)
    assert experiment.standardize
    grid = InProcessGrid(fedml_client.app, 3, dataclasses.replace(as_read_now).to_flat())
    with caplog.at_level(logging.WARNING):
        summary = run_experiment(grid, experiment, store, checkpoint=checkpoint)
    assert summary.rounds == 3 and "hold no feature statistics" in caplog.text
    assert all("preprocess" not in row for row in _rows(tmp_path / "r"))


def test_the_model_file_alone_serves_raw_rows_as_the_run_evaluated_them(tmp_path):
    """`fedml.models.load_model(RUN_DIR/model.safetensors)`: the run's architecture,
    weights and standardisation from the one file; on the raw test rows (a missing
    value among them) it gives the server's own evaluation."""
    from fedml.models import load_model

    cfg = load_config(
        None,
        {"data.dataset": "fed-heart-disease", "model.name": "mlp", "rounds": 2,
         "out": str(tmp_path / "run")},
    )  # fmt: skip
    summary = simulate(cfg)
    model = load_model(tmp_path / "run" / "model.safetensors")
    test_x = np.concatenate([h.test.x for h in read_hospitals()])
    test_y = np.concatenate([h.test.y for h in read_hospitals()])
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(test_x)).argmax(1).numpy() == test_y).mean()
    assert accuracy == pytest.approx(summary.final["server"]["accuracy"])
    gap = test_x[:1].copy()
    gap[0, 3] = np.nan  # cholesterol unknown: the federation's mean
    mean = _scaling_state(tmp_path / "run")["mean"]
    filled = test_x[:1].copy()
    filled[0, 3] = mean[3]
    with torch.no_grad():
        torch.testing.assert_close(model(torch.from_numpy(gap)), model(torch.from_numpy(filled)))
    from fedml.runstore import read_model
    from fedml.runstore.format import encode_arrays

    older = tmp_path / "older.safetensors"  # as fedml wrote model files before
    older.write_bytes(encode_arrays(read_model(tmp_path / "run" / "model.safetensors"), 2))
    with pytest.raises(FedmlError, match="does not say which model it holds"):
        load_model(older)


def test_a_model_file_naming_a_user_model_is_loaded_only_when_trusted(tmp_path):
    from fedml.models import load_model
    from fedml.runstore import read_model
    from fedml.runstore.format import encode_arrays

    path = tmp_path / "user.safetensors"
    description = {"name": "evil_module:factory", "hidden": 4, "input_shape": [3],
                   "num_classes": 2, "private": False, "fix_model": False,
                   "standardization": None}  # fmt: skip
    simulate(load_config(None, {"data.dataset": "breast-cancer", "simulation.clients": 2,
                                "rounds": 1, "out": str(tmp_path / "r")}))  # fmt: skip
    path.write_bytes(
        encode_arrays(read_model(tmp_path / "r" / "model.safetensors"), 1, description)
    )
    with pytest.raises(FedmlError, match="loading it imports and runs that module"):
        load_model(path)
