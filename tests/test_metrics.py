"""Clinical metrics (fedml.metrics) against scikit-learn, computed at the sites and on
the server, and what a run's history says per site."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from replies import replies_from
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score, roc_auc_score

from clients.trainer import evaluation_metrics
from fedml.config import load_config
from fedml.data import Shard
from fedml.data.heart import read_hospitals
from fedml.metrics import auroc, binary_metrics, pooled_binary
from fedml.models import mlp
from simulations.engine import simulate

# scores on a coarse grid, so ties (which AUROC counts one half) are common
scores_and_labels = st.integers(2, 60).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 8).map(lambda k: k / 8), min_size=n, max_size=n),
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
    )
)


@settings(max_examples=150, deadline=None)
@given(scores_and_labels)
def test_binary_metrics_are_scikit_learns(data):
    scores, labels = np.array(data[0]), np.array(data[1])
    result = binary_metrics(scores, labels)
    predicted = (scores > 0.5).astype(int)
    assert result["tp"] + result["fp"] + result["tn"] + result["fn"] == len(labels)
    if labels.min() != labels.max():
        assert result["auroc"] == pytest.approx(roc_auc_score(labels, scores))
        assert result["sensitivity"] == pytest.approx(recall_score(labels, predicted))
        assert result["specificity"] == pytest.approx(recall_score(1 - labels, 1 - predicted))
        assert result["balanced_accuracy"] == pytest.approx(
            balanced_accuracy_score(labels, predicted)
        )
    else:  # one class only: no AUROC, and no rate over an empty class
        assert "auroc" not in result and "balanced_accuracy" not in result
    if "f1" in result:
        assert result["f1"] == pytest.approx(f1_score(labels, predicted))


@settings(max_examples=100, deadline=None)
@given(scores_and_labels, st.integers(1, 5))
def test_rates_from_the_sites_counts_are_the_pooled_rows_rates(data, cuts):
    scores, labels = np.array(data[0]), np.array(data[1])
    edges = np.linspace(0, len(labels), cuts + 1).astype(int)
    sites = [binary_metrics(scores[a:b], labels[a:b]) for a, b in itertools.pairwise(edges)]
    pooled = pooled_binary(sites)
    whole = binary_metrics(scores, labels)
    for key in ("tp", "fp", "tn", "fn", "sensitivity", "specificity", "f1"):
        assert (key in pooled) == (key in whole)
        if key in whole:
            assert pooled[key] == pytest.approx(whole[key])


def test_auroc_of_a_perfect_a_reversed_and_a_constant_score():
    labels = np.array([0, 0, 1, 1]) == 1
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert auroc(np.full(4, 0.5), labels) == 0.5
    assert auroc(np.array([0.1, 0.2]), np.array([True, True])) is None


def test_a_two_class_models_evaluation_has_them_and_a_ten_class_ones_does_not():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    two = evaluation_metrics(mlp((4,), 2), Shard(x, rng.integers(0, 2, 50)), torch.device("cpu"))
    assert {"auroc", "sensitivity", "specificity", "balanced_accuracy", "f1", "tp"} <= set(two)
    assert two["num-examples"] == 50
    ten = evaluation_metrics(mlp((4,), 10), Shard(x, rng.integers(0, 10, 50)), torch.device("cpu"))
    assert set(ten) == {"loss", "accuracy", "num-examples"}


def test_a_hospital_run_reports_each_hospital_and_exact_pooled_rates(tmp_path):
    """fed-heart-disease: each hospital evaluates the global model on its validation
    rows and on its own test rows; the row names them; the federated rates are the
    pooled validation rows' rates; the server's AUROC is scikit-learn's on its test set."""
    from safetensors.torch import load_file

    from fedml.models import model_for, with_standardization
    from fedml.runstore import open_resume

    cfg = load_config(
        None,
        {"data.dataset": "fed-heart-disease", "model.name": "logreg", "rounds": 3,
         "out": str(tmp_path / "run")},
    )  # fmt: skip
    summary = simulate(cfg)
    row = summary.final
    assert list(row["sites"]) == ["cleveland", "hungary", "switzerland", "va-long-beach"]
    tests = [row["sites"][h.name]["test"]["num-examples"] for h in read_hospitals()]
    assert tests == [104, 89, 16, 45]
    validation = [site["validation"] for site in row["sites"].values()]
    pooled = pooled_binary(validation)
    for key in ("sensitivity", "specificity", "balanced_accuracy", "f1"):
        assert row["evaluate"][key] == pytest.approx(pooled[key])
    assert "auroc" not in row["evaluate"] and "tp" not in row["evaluate"]
    assert "tp" not in row["evaluate_median"]

    store, _ = open_resume(tmp_path / "run", {})
    checkpoint, _ = store.resume(cfg)
    store.close()
    model = model_for(cfg, (13,), 2)
    model.load_state_dict(load_file(tmp_path / "run" / "model.safetensors"))
    scaling = checkpoint.state["scaling"]
    from fedml.data.features import Standardization

    with_standardization(model, Standardization(scaling["mean"], scaling["scale"]))
    test_x = np.concatenate([h.test.x for h in read_hospitals()])
    test_y = np.concatenate([h.test.y for h in read_hospitals()])
    with torch.no_grad():
        scores = torch.softmax(model(torch.from_numpy(test_x)), dim=1)[:, 1].numpy()
    assert row["server"]["auroc"] == pytest.approx(roc_auc_score(test_y, scores))
    history = [
        json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    ]
    assert all("sites" in r for r in history)


def test_a_target_on_auroc_stops_the_run(tmp_path):
    overrides = {
        "data.dataset": "fed-heart-disease",
        "model.name": "logreg",
        "rounds": 10,
        "stop.target": "server.auroc >= 0.5",
        "out": str(tmp_path / "run"),
    }
    summary = simulate(load_config(None, overrides))
    assert summary.stop_reason.startswith("target") and summary.rounds == 1


def test_the_sites_in_words_and_in_summary_csv(tmp_path):
    """The summary names the sites' mean and the worst site, on their own test rows when
    every site has some, else on their validation rows."""
    from fedml.records import describe_sites, site_accuracies

    row = {
        "sites": {
            "a": {"validation": {"accuracy": 0.9}, "test": {"accuracy": 0.8}},
            "b": {"validation": {"accuracy": 0.7}, "test": {"accuracy": 0.6}},
        }
    }
    assert site_accuracies(row) == ("test", {"a": 0.8, "b": 0.6})
    assert describe_sites(row) == (
        "2 sites on their own test rows: mean accuracy 0.7000, worst b 0.6000"
    )
    del row["sites"]["b"]["test"]
    assert site_accuracies(row) == ("validation", {"a": 0.9, "b": 0.7})
    assert describe_sites({}) == ""

    from fedml.report import write_report

    simulate(
        load_config(
            None,
            {
                "data.dataset": "fed-heart-disease",
                "model.name": "logreg",
                "rounds": 2,
                "out": str(tmp_path / "run"),
            },
        )
    )
    write_report([tmp_path / "run"], tmp_path / "report")
    import csv

    [line] = list(csv.DictReader((tmp_path / "report" / "summary.csv").open()))
    assert line["sites_on"] == "test"
    assert line["worst_site"] in {"cleveland", "hungary", "switzerland", "va-long-beach"}
    assert 0.5 < float(line["worst_site_accuracy"]) <= float(line["sites_mean_accuracy"])


def test_site_names_are_safe_never_overwrite_and_hostile_test_metrics_are_dropped():
    """A site's name is its own word: made safe for columns and MLflow, a taken name gets
    the node id added (the honest entry stays), and test metrics that fail screening
    (an accuracy of -5, counts that do not add up) are left out."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from fedml.records import SITE_RECORD
    from fedml.site_results import site_results

    validation = {"loss": 0.3, "accuracy": 0.8, "num-examples": 10}
    contents = []
    for name, test in [
        ("a", {"test-accuracy": 0.7, "test-num-examples": 5}),
        ("a", {"test-accuracy": -5.0, "test-num-examples": 5}),
        ("a-node2", {"test-accuracy": 0.6, "test-num-examples": 5}),
        (
            "St Mary's (#1)/..",
            {"test-tp": 9, "test-fp": 0, "test-tn": 0, "test-fn": 0, "test-num-examples": 5},
        ),
        ("..", {}),
    ]:
        content = RecordDict({"metrics": MetricRecord(validation)})
        content[SITE_RECORD] = ConfigRecord({"name": name, **test})
        contents.append(content)
    sites = site_results(replies_from(contents))
    assert sorted(sites) == ["St Mary_s __1__..", "a", "a-node2", "a-node2-node3", "node-5"]
    assert sites["a"]["test"]["accuracy"] == 0.7  # node 1's, never overwritten
    assert "test" not in sites["a-node2"]  # node 2: accuracy -5 is refused
    assert sites["a-node2-node3"]["test"]["accuracy"] == 0.6
    assert "test" not in sites["St Mary_s __1__.."]  # counts that do not add up


def test_a_sites_personal_metrics_are_screened_like_its_others():
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from fedml.records import SITE_RECORD
    from fedml.site_results import site_results

    good = {"personal-accuracy": 0.9, "personal-num-examples": 10}
    bad = {"personal-accuracy": 5.0, "personal-num-examples": 10, "personal-test-accuracy": 0.5,
           "personal-test-num-examples": 3}  # fmt: skip
    contents = []
    for name, extra in (("a", good), ("b", bad)):
        content = RecordDict({"metrics": MetricRecord({"loss": 0.3, "num-examples": 10})})
        content[SITE_RECORD] = ConfigRecord({"name": name, **extra})
        contents.append(content)
    sites = site_results(replies_from(contents))
    assert sites["a"]["personal"] == {"validation": {"accuracy": 0.9, "num-examples": 10.0}}
    assert sites["b"]["personal"] == {"test": {"accuracy": 0.5, "num-examples": 3.0}}


def test_a_name_crafted_to_collide_at_the_length_limit_still_ends_unique():
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from fedml.records import SITE_RECORD
    from fedml.site_results import site_results

    long = "x" * 64
    crafted = long[:58] + "-node2"  # what node 2's renamed entry would be called
    contents = []
    for name in (crafted, long):
        content = RecordDict({"metrics": MetricRecord({"loss": 0.3, "num-examples": 10})})
        content[SITE_RECORD] = ConfigRecord({"name": name})
        contents.append(content)
    # node 1 takes the crafted name first; node 2's "x"*64 is taken by nobody, but
    # a second reply with the same long name must still get a fresh one
    contents.append(contents[1])
    sites = site_results(replies_from(contents))
    assert len(sites) == 3 and all(len(name) <= 64 for name in sites)
