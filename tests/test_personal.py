"""Personalization by local fine-tuning (`client.fine_tune_epochs`): each site fine-tunes
the global model on its own training rows at every evaluation and reports that personal
model beside the global one; the personal model never leaves the site and changes
nothing of the global training."""

from __future__ import annotations

import json

import pytest
from flwr.app import Message
from flwr.clientapp import ClientApp

from clients import app as fedml_client
from fedml.config import load_config
from fedml.runstore import RunStore
from fedml.server import Experiment, run_experiment
from simulations.inprocess import InProcessGrid

HEART = {"data.dataset": "fed-heart-disease", "model.name": "logreg", "rounds": 2}


def _play(tmp_path, name: str, replies: list[Message] | None = None, **overrides):
    cfg = load_config(None, {**HEART, **overrides, "out": str(tmp_path / name)})
    app = ClientApp()
    app.train()(fedml_client.train)
    app.query("feature_stats")(fedml_client.feature_stats)

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        reply = fedml_client.evaluate_global(msg, context)
        if replies is not None:
            replies.append(reply)
        return reply

    grid = InProcessGrid(app, cfg.simulation.clients, cfg.to_flat())
    store = RunStore.create(tmp_path / name, cfg)
    return run_experiment(grid, Experiment.prepare(cfg), store).history


def test_fine_tuned_models_are_reported_per_site_and_never_leave_it(tmp_path):
    replies: list[Message] = []
    personal = _play(tmp_path, "personal", replies, **{"client.fine_tune_epochs": 1})
    plain = _play(tmp_path, "plain")
    for row, base in zip(personal, plain, strict=True):
        assert row["server"] == base["server"] and row["train"] == base["train"]
        for name, site in row["sites"].items():
            assert set(site["personal"]) == {"validation", "test"}
            assert site["test"] == base["sites"][name]["test"]  # the global model's
    fine_tuned = [s["personal"]["test"]["accuracy"] for s in personal[-1]["sites"].values()]
    global_ = [s["test"]["accuracy"] for s in personal[-1]["sites"].values()]
    assert fine_tuned != global_
    # only metrics leave a site: no arrays in any evaluate reply
    assert replies and all(set(r.content.keys()) == {"metrics", "site"} for r in replies)
    assert not any(r.content.array_records for r in replies)
    lines = (tmp_path / "personal" / "history.jsonl").read_text().splitlines()
    assert "personal" in json.loads(lines[-1])["sites"]["cleveland"]


@pytest.mark.parametrize("epochs", [-1, 1001])
def test_fine_tune_epochs_out_of_range_is_one_clear_error(epochs):
    from fedml.errors import FedmlError

    with pytest.raises(FedmlError, match=r"client\.fine_tune_epochs must be 0 \(off\) \.\. 1000"):
        load_config(None, {"client.fine_tune_epochs": epochs})


def test_fine_tuning_is_refused_with_example_level_dp():
    from fedml.errors import FedmlError

    with pytest.raises(FedmlError, match=r"not available with dp\.mode = 'sample'"):
        load_config(None, {"client.fine_tune_epochs": 1, "dp.mode": "sample"})


def test_sites_fine_tune_at_the_rounds_learning_rate(tmp_path):
    """A decaying step: the personal models of round 2 are tuned at round 2's rate."""
    seen: list[float] = []
    original = fedml_client.train_local

    def spy(model, shard, settings, device, generator):
        seen.append(settings.lr)
        return original(model, shard, settings, device, generator)

    fedml_client.train_local = spy
    try:
        history = _play(tmp_path, "decay", **{"client.fine_tune_epochs": 1, "client.lr_decay": 0.5})
    finally:
        fedml_client.train_local = original
    assert [row["lr"] for row in history] == [0.1, 0.05]
    assert set(seen) == {0.1, 0.05}  # training and fine-tuning, each at its round's rate
