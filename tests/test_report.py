"""`fedml report`: plots and CSV files read back, overlays, resumed and empty runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from fedml import records
from fedml.config import load_config
from fedml.errors import FedmlError
from fedml.report import DPI, SIZES, figures, load_runs, write_report
from fedml.runstore import RunStore, open_resume
from simulations.engine import simulate


def _simulate(out: Path, **overrides) -> list[dict]:
    base = {"rounds": 3, "simulation.clients": 4, "client.local_epochs": 1, "out": str(out)}
    return simulate(load_config(None, base | overrides)).history


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A FedAvg run of 3 rounds and a FedProx run of 4 with a client failing each round."""
    root = tmp_path_factory.mktemp("runs")
    fedavg = _simulate(root / "fedavg")
    fedprox = _simulate(
        root / "fedprox",
        **{"rounds": 4, "strategy.name": "fedprox", "simulation.dropout": 0.25},
    )
    return root, {"fedavg": fedavg, "fedprox": fedprox}


def _lines(figure, label_part: str) -> list:
    return [line for ax in figure.axes for line in ax.get_lines() if label_part in line.get_label()]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# -- the per-round record ---------------------------------------------------------------

leaf = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=3),
)
keys = st.text(alphabet="abcxyz-_", min_size=1, max_size=4)
tree = st.recursive(leaf, lambda inner: st.dictionaries(keys, inner, max_size=4), max_leaves=12)


def _leaves(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    else:
        yield path, node


@given(st.dictionaries(keys, tree, max_size=5), st.integers(1, 1000))
def test_flatten_keeps_every_finite_number_under_its_path_and_nothing_else(row, server_round):
    row = {**row, "round": server_round}
    expected = {
        "/".join(path): value
        for path, value in _leaves({k: v for k, v in row.items() if k != "round"})
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }
    assert records.flatten(row) == expected


def test_flatten_of_a_history_row_names_the_series_the_report_plots():
    row = {
        "round": 3,
        "server": {"accuracy": 0.9, "loss": 0.3},
        "clients": {"replied": 4, "failed": 1},
        "privacy": {"level": "sample", "epsilon_max": 2.5},
        "stop": "max rounds",
        "seconds": 1.5,
    }
    assert records.flatten(row) == {
        records.SERVER_ACCURACY: 0.9,
        records.SERVER_LOSS: 0.3,
        "clients/replied": 4,
        "clients/failed": 1,
        records.EPSILON_MAX: 2.5,
        records.SECONDS: 1.5,
    }


# -- figures and CSV files --------------------------------------------------------------


def test_a_finished_run_gets_every_figure_with_one_point_per_round(two_runs, tmp_path):
    root, histories = two_runs
    history = histories["fedavg"]
    report = write_report([root / "fedavg"], tmp_path / "report")
    names = {p.name for p in report.files}
    assert names == {"accuracy.png", "loss.png", "clients.png", "time.png", "sites.png"} | {
        "summary.csv",
        "rounds.csv",
        "sites.csv",
    }  # no privacy figure without DP
    (run,), _ = load_runs([root / "fedavg"])
    drawn = figures([run])
    (test_line,) = _lines(drawn["accuracy"], "test (server)")
    assert list(test_line.get_xdata()) == [1, 2, 3]
    assert list(test_line.get_ydata()) == [row["server"]["accuracy"] for row in history]
    (federated,) = _lines(drawn["loss"], "federated")
    assert list(federated.get_ydata()) == [row["evaluate"]["loss"] for row in history]
    (train,) = _lines(drawn["loss"], "train")
    assert list(train.get_ydata()) == [row["train"]["loss"] for row in history]
    (seconds,) = drawn["time"].axes[0].get_lines()
    assert list(seconds.get_ydata()) == [row["seconds"] for row in history]
    panels = [ax.get_ylabel() for ax in drawn["clients"].axes]
    assert panels == [
        "clients replied",
        "clients aggregated",
        "clients failed",
        "clients rejected",
    ]
    replied = drawn["clients"].axes[0].get_lines()[0]
    assert list(replied.get_ydata()) == [4, 4, 4]


def test_the_png_files_are_images_of_the_declared_size(two_runs, tmp_path):
    root, _ = two_runs
    report = write_report([root / "fedavg"], tmp_path / "report")
    for path in report.files:
        if path.suffix == ".png":
            with Image.open(path) as image:
                image.verify()  # a whole, readable PNG
            with Image.open(path) as image:
                width, height = SIZES[path.stem]
                assert image.format == "PNG"
                assert image.size == (round(width * DPI), round(height * DPI))


def test_two_runs_overlay_on_the_same_axes_with_a_legend(two_runs, tmp_path):
    root, histories = two_runs
    runs, skipped = load_runs([root / "fedavg", root / "fedprox"])
    assert skipped == []
    drawn = figures(runs)
    ax = drawn["accuracy"].axes[0]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == [
        "fedavg: test (server)",
        "fedavg: federated",
        "fedprox: test (server)",
        "fedprox: federated",
    ]
    (fedprox_test,) = _lines(drawn["accuracy"], "fedprox: test")
    assert list(fedprox_test.get_xdata()) == [1, 2, 3, 4]
    (fedavg_test,) = _lines(drawn["accuracy"], "fedavg: test")
    assert fedavg_test.get_color() != fedprox_test.get_color()
    failed_panel = drawn["clients"].axes[2]
    by_run = {line.get_label(): list(line.get_ydata()) for line in failed_panel.get_lines()}
    assert by_run["fedavg"] == [0, 0, 0]
    assert by_run["fedprox"] == [row["clients"]["failed"] for row in histories["fedprox"]]
    assert sum(by_run["fedprox"]) == 4  # one of four clients dropped every round


def test_summary_csv_has_one_row_per_run_and_rounds_csv_one_per_round(two_runs, tmp_path):
    root, histories = two_runs
    report = write_report([root], tmp_path / "report")  # the folder of runs
    summary = {row["run"]: row for row in _read_csv(report.out / "summary.csv")}
    assert set(summary) == {"fedavg", "fedprox"}
    for name, history in histories.items():
        line = summary[name]
        assert line["strategy"] == name
        assert line["partition"] == "dirichlet:0.5"  # `auto` shows as the split it is
        assert int(line["rounds"]) == len(history)
        assert line["stop_reason"] == "max rounds"
        assert float(line["last_test_accuracy"]) == history[-1]["server"]["accuracy"]
        best = max(history, key=lambda row: (row["evaluate"]["accuracy"], -row["round"]))
        assert int(line["best_round"]) == best["round"]  # on validation, not the test set
        assert math.isclose(float(line["seconds"]), math.fsum(r["seconds"] for r in history))
        assert line["epsilon"] == ""
    rounds = _read_csv(report.out / "rounds.csv")
    assert [(r["run"], int(r["round"])) for r in rounds] == [
        ("fedavg", 1),
        ("fedavg", 2),
        ("fedavg", 3),
        ("fedprox", 1),
        ("fedprox", 2),
        ("fedprox", 3),
        ("fedprox", 4),
    ]
    fedprox_rows = [r for r in rounds if r["run"] == "fedprox"]
    assert [float(r["mu"]) for r in fedprox_rows] == [row["mu"] for row in histories["fedprox"]]
    assert all(r["mu"] == "" for r in rounds if r["run"] == "fedavg")  # not a FedAvg series


def test_a_resumed_run_is_reported_once_per_round_and_only_as_far_as_committed(tmp_path):
    out = tmp_path / "run"
    first = _simulate(out, rounds=2)
    store, cfg = open_resume(out, {"rounds": 4})
    resumed = simulate(cfg, resume=store).history
    assert [row["round"] for row in resumed] == [1, 2, 3, 4]
    # a crash can leave a row that no commit holds: it is not part of the run
    with (out / "history.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({**resumed[-1], "round": 5}) + "\n")
    (run,), _ = load_runs([out])
    (test_line,) = _lines(figures([run])["accuracy"], "test (server)")
    assert list(test_line.get_xdata()) == [1, 2, 3, 4]
    assert list(test_line.get_ydata())[:2] == [row["server"]["accuracy"] for row in first]
    assert list(test_line.get_ydata()) == [row["server"]["accuracy"] for row in resumed]


def test_a_privacy_run_gets_an_epsilon_figure_and_column(tmp_path):
    history = _simulate(
        tmp_path / "dp",
        rounds=2,
        **{"simulation.clients": 3, "dp.mode": "sample", "dp.noise_multiplier": 1.0},
    )
    report = write_report([tmp_path / "dp"], tmp_path / "report")
    assert report.out / "privacy.png" in report.files
    (run,), _ = load_runs([tmp_path / "dp"])
    (spent,) = _lines(figures([run])["privacy"], "max over clients")
    epsilons = [row["privacy"]["epsilon_max"] for row in history]
    assert list(spent.get_ydata()) == epsilons
    assert epsilons[0] < epsilons[1]  # spending grows round by round
    (line,) = _read_csv(report.out / "summary.csv")
    assert float(line["epsilon"]) == epsilons[-1] and line["dp"] == "sample"


def test_a_run_without_rounds_is_a_clear_message_not_a_crash(two_runs, tmp_path):
    empty = tmp_path / "empty"
    RunStore.create(empty, load_config(None, {"out": str(empty)})).close()
    with pytest.raises(FedmlError, match="no committed round yet"):
        write_report([empty], tmp_path / "report")
    assert not (tmp_path / "report").exists()
    # next to a run that has rounds, it is left out with the reason
    root, _ = two_runs
    report = write_report([empty, root / "fedavg"], tmp_path / "report")
    assert len(report.skipped) == 1 and "empty" in report.skipped[0]
    assert [row["run"] for row in _read_csv(report.out / "summary.csv")] == ["fedavg"]


def test_not_a_run_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FedmlError, match="nothing does not exist"):
        write_report([tmp_path / "nothing"], tmp_path / "report")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedmlError, match="neither a run directory nor a folder of runs"):
        write_report([tmp_path / "empty"], tmp_path / "report")


def test_runs_with_the_same_name_get_labels_that_tell_them_apart(two_runs, tmp_path):
    root, _ = two_runs
    for group in ("a", "b"):
        _simulate(tmp_path / group / "exp", rounds=1)
    runs, _ = load_runs([tmp_path / "a" / "exp", tmp_path / "b" / "exp", root / "fedavg"])
    assert [run.label for run in runs] == ["a/exp", "b/exp", f"{root.name}/fedavg"]


def test_dropped_stragglers_show_as_fewer_aggregated_than_replied(tmp_path):
    """FedAvg drops stragglers' partial work and FedProx keeps it: the clients figure
    tells the two runs apart (replied alone would not)."""
    for name in ("fedavg", "fedprox"):
        _simulate(tmp_path / name, **{"strategy.name": name, "simulation.stragglers": 0.5})
    runs, _ = load_runs([tmp_path / "fedavg", tmp_path / "fedprox"])
    drawn = figures(runs)["clients"]
    panels = {ax.get_ylabel(): ax for ax in drawn.axes}
    assert "clients stragglers" in panels

    def by_run(panel: str) -> dict[str, list]:
        lines = panels[panel].get_lines()
        return {line.get_label(): list(line.get_ydata()) for line in lines}

    aggregated, replied = by_run("clients aggregated"), by_run("clients replied")
    assert aggregated["fedprox"] == replied["fedprox"] == [4, 4, 4]
    assert aggregated["fedavg"] == [4 - 2, 4 - 2, 4 - 2]  # 2 of 4 straggled each round


def test_a_resumed_runs_summary_gives_the_whole_runs_time_too(tmp_path):
    """Resuming a finished run plays no round: its summary must not read as a run that
    took 0.0 s."""
    from rich.console import Console

    from fedml.progress import print_summary

    _simulate(tmp_path / "run", rounds=2)
    store, cfg = open_resume(tmp_path / "run", {})
    summary = simulate(cfg, resume=store)
    console = Console(record=True, width=120)
    print_summary(summary, console)
    text = console.export_text()
    in_rounds = sum(row["seconds"] for row in summary.history)
    assert f"{in_rounds:.1f} s in the run's rounds" in text and "this session" in text


def test_rounds_to_target_is_the_first_round_that_met_the_runs_target(two_runs):
    """summary.csv's `target_round` (the FedAvg paper's Table 2 measure): the first
    committed round whose metric met `stop.target`; empty when never met or no target."""
    import dataclasses

    from fedml.config import with_overrides
    from fedml.report import summary_row, target_round

    root, histories = two_runs
    (run,) = load_runs([root / "fedprox"])[0]
    accuracies = [row["server"]["accuracy"] for row in histories["fedprox"]]
    assert target_round(run.status) is None and summary_row(run)["target_round"] == ""
    for threshold in sorted(set(accuracies)):
        target = f"server.accuracy >= {threshold!r}"
        status = dataclasses.replace(
            run.status, cfg=with_overrides(run.status.cfg, {"stop.target": target})
        )
        expected = 1 + next(i for i, a in enumerate(accuracies) if a >= threshold)
        assert target_round(status) == expected
        line = summary_row(dataclasses.replace(run, status=status))
        assert (line["target"], line["target_round"]) == (target, expected)
    never = with_overrides(run.status.cfg, {"stop.target": "server.accuracy > 1.0"})
    assert target_round(dataclasses.replace(run.status, cfg=never)) is None


def test_report_prints_rounds_to_target_for_runs_with_a_target(tmp_path):
    from typer.testing import CliRunner

    from fedml.cli import app

    _simulate(tmp_path / "runs" / "quick", **{"stop.target": "server.accuracy >= 0.5"})
    _simulate(tmp_path / "runs" / "never", **{"stop.target": "server.accuracy > 1.0"})
    done = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "r")])
    assert done.exit_code == 0, done.output
    summary = {row["run"]: row for row in _read_csv(tmp_path / "r" / "summary.csv")}
    assert summary["quick"]["target_round"] == summary["quick"]["rounds"]  # it stopped there
    assert summary["never"]["target_round"] == "" and summary["never"]["rounds"] == "3"
    table = done.output[done.output.index("rounds to target") :]
    assert "not reached" in table and "quick" in table and "never" in table


def test_a_full_disk_while_writing_leaves_the_previous_report_whole(
    two_runs, tmp_path, monkeypatch
):
    """Issue 34: a report written to a full disk left a partial report. Now the old one
    stays as it was, file for file, and no staging folder is left behind."""
    import errno

    import fedml.report as report_module

    root, _ = two_runs
    out = tmp_path / "report"
    write_report([root / "fedavg"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    honest_write, calls = report_module.atomic_write, []

    def full_after_two(path, data):
        calls.append(path)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        honest_write(path, data)

    monkeypatch.setattr(report_module, "atomic_write", full_after_two)
    with pytest.raises(FedmlError, match="space"):
        write_report([root / "fedprox"], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.setattr(report_module, "atomic_write", honest_write)
    (out / "privacy.png").write_bytes(before["accuracy.png"])  # an earlier DP run's figure
    again = write_report([root / "fedprox"], out)
    assert {p.name for p in out.iterdir()} == {p.name for p in again.files}  # no stale one


def test_per_site_results_get_a_figure_and_a_table_global_and_personal(tmp_path):
    """Four hospitals with Ditto: sites.png draws each hospital's global (solid) and
    personal (dashed) accuracy on its own test rows, and sites.csv has one row per
    round, hospital, model and rows, with the history's values."""
    history = _simulate(
        tmp_path / "heart",
        **{"data.dataset": "fed-heart-disease", "model.name": "logreg",
           "client.personal": "ditto"},
    )  # fmt: skip
    report = write_report([tmp_path / "heart"], tmp_path / "report")
    assert {"sites.png", "sites.csv"} <= {p.name for p in report.files}
    (run,), _ = load_runs([tmp_path / "heart"])
    (ax,) = figures([run])["sites"].axes
    assert ax.get_ylabel() == "accuracy (own test rows)"
    hospitals = list(history[-1]["sites"])
    assert hospitals == ["cleveland", "hungary", "switzerland", "va-long-beach"]
    for name in hospitals:
        (solid,) = _lines(figures([run])["sites"], name)[:1]
        assert list(solid.get_ydata()) == [r["sites"][name]["test"]["accuracy"] for r in history]
        (dashed,) = _lines(figures([run])["sites"], f"{name} (personal)")
        assert dashed.get_linestyle() == "--"
        personal = [r["sites"][name]["personal"]["test"]["accuracy"] for r in history]
        assert list(dashed.get_ydata()) == personal
    table = _read_csv(report.out / "sites.csv")
    assert len(table) == 3 * 4 * 2 * 2  # rounds x hospitals x (global, personal) x rows
    line = next(
        r for r in table
        if (r["round"], r["site"], r["model"], r["rows"]) == ("3", "hungary", "personal", "test")
    )  # fmt: skip
    expected = history[2]["sites"]["hungary"]["personal"]["test"]
    assert float(line["accuracy"]) == expected["accuracy"]
    assert float(line["auroc"]) == expected["auroc"]
    assert int(float(line["num-examples"])) == 89
