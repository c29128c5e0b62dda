"""Personalization by local fine-tuning (`client.fine_tune_epochs`): each site fine-tunes
the global model on its own training rows at every evaluation and reports that personal
model beside the global one; the personal model never leaves the site and changes
nothing of the global training."""

from __future__ import annotations

import dataclasses
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

    def spy(model, shard, settings, device, generator, **kwargs):
        seen.append(settings.lr)
        return original(model, shard, settings, device, generator, **kwargs)

    fedml_client.train_local = spy
    try:
        history = _play(tmp_path, "decay", **{"client.fine_tune_epochs": 1, "client.lr_decay": 0.5})
    finally:
        fedml_client.train_local = original
    assert [row["lr"] for row in history] == [0.1, 0.05]
    assert set(seen) == {0.1, 0.05}  # training and fine-tuning, each at its round's rate


# ------------------------------------------------------- Ditto and FedPer: kept at the site
def _nodes_personal(run, name: str) -> dict[int, dict]:
    """Each node's committed personal state (the newest commit's nodes file)."""
    from flwr.app import RecordDict

    from clients.kept_state import RECORD_PREFIX
    from fedml.arrays import to_numpy
    from fedml.runstore import RunStore

    checkpoint = RunStore.open(run).latest_valid()[0]
    states: dict[int, RecordDict] = checkpoint.node_states
    record = RECORD_PREFIX + name
    return {
        node: {k: to_numpy(a) for k, a in state.array_records[record].items()}
        for node, state in states.items()
        if record in state.array_records
    }


def _spy_app(train_replies: list, evaluate_replies: list) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        reply = fedml_client.train(msg, context)
        train_replies.append((msg, reply))
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        reply = fedml_client.evaluate_global(msg, context)
        evaluate_replies.append(reply)
        return reply

    app.query("feature_stats")(fedml_client.feature_stats)
    return app


def _play_spied(tmp_path, name, **overrides):
    cfg = load_config(None, {**HEART, **overrides, "out": str(tmp_path / name)})
    trains, evaluations = [], []
    grid = InProcessGrid(_spy_app(trains, evaluations), cfg.simulation.clients, cfg.to_flat())
    store = RunStore.create(tmp_path / name, cfg)
    history = run_experiment(grid, Experiment.prepare(cfg), store).history
    store.close()
    return history, trains, evaluations


def test_ditto_keeps_a_personal_model_at_each_site_and_the_global_training_unchanged(tmp_path):
    import numpy as np

    history, trains, evaluations = _play_spied(
        tmp_path, "ditto", **{"rounds": 3, "client.personal": "ditto", "client.ditto_lambda": 0.5}
    )
    plain, plain_trains, _ = _play_spied(tmp_path, "plain", rounds=3)
    for row, base in zip(history, plain, strict=True):
        assert row["server"] == base["server"] and row["train"] == base["train"]
    # the train replies are the plain run's, array for array: v never enters one
    for (_, reply), (_, base) in zip(trains, plain_trains, strict=True):
        assert reply.content.array_records.keys() == base.content.array_records.keys()
        for key, array in reply.content["arrays"].items():
            assert array.data == base.content["arrays"][key].data
    assert all(set(r.content.keys()) == {"metrics", "site"} for r in evaluations)
    # every site trained in round 1, so each reports its personal model from then on
    for row in history:
        assert all("personal" in site for site in row["sites"].values())
        personal = [s["personal"]["test"]["accuracy"] for s in row["sites"].values()]
        assert personal != [s["test"]["accuracy"] for s in row["sites"].values()]
    # and keeps it in its committed node state: one whole model per site, not the global
    kept = _nodes_personal(tmp_path / "ditto", "personal-ditto")
    assert sorted(kept) == [1, 2, 3, 4]
    final = fedml_client.to_state_dict(RunStore.open(tmp_path / "ditto").latest_valid()[0].arrays)
    for state in kept.values():
        assert set(state) == set(final)
        assert not np.array_equal(state["1.weight"], final["1.weight"].numpy())


def test_dittos_pull_is_towards_the_global_model_not_its_own_start():
    """Ditto's proximal term anchors v at the round's global model w: started far from
    w with a strong pull, v ends near w; without the anchor (FedProx's rule, the start)
    it would stay near its start."""
    import numpy as np
    import torch

    from clients.trainer import train_local
    from fedml.data import Shard
    from fedml.settings import TrainSettings

    rng = np.random.default_rng(0)
    shard = Shard(rng.normal(size=(64, 5)).astype(np.float32), rng.integers(0, 2, 64))
    settings = TrainSettings(local_epochs=3, batch_size=16, lr=0.05, momentum=0.0)

    def distances(mu: float) -> tuple[float, float]:
        torch.manual_seed(1)
        w, v = torch.nn.Linear(5, 2), torch.nn.Linear(5, 2)
        with torch.no_grad():
            v.weight.add_(3.0)  # the personal model starts far from the global one
        start = [p.detach().clone() for p in v.parameters()]
        pulled = dataclasses.replace(settings, proximal_mu=mu)
        train_local(v, shard, pulled, torch.device("cpu"), torch.Generator().manual_seed(0),
                    anchor=w)  # fmt: skip
        with torch.no_grad():
            pairs = zip(v.parameters(), w.parameters(), strict=True)
            to_w = sum((a - b).norm() ** 2 for a, b in pairs)
            to_start = sum((a - b).norm() ** 2 for a, b in zip(v.parameters(), start, strict=True))
        return float(to_w) ** 0.5, float(to_start) ** 0.5

    near_w, moved = distances(10.0)
    free_w, free_moved = distances(0.0)
    assert near_w < 0.1 * free_w  # pulled to w ...
    assert moved > 5 * free_moved  # ... far from where v started


def test_fedper_sends_the_head_it_received_and_keeps_its_own(tmp_path):
    import numpy as np

    from fedml.arrays import to_numpy

    history, trains, evaluations = _play_spied(
        tmp_path, "fedper", **{"model.name": "mlp", "client.personal": "fedper"}
    )
    head = ["3.weight", "3.bias"]  # the MLP's output layer
    body = [k for k in trains[0][0].content["arrays"] if k not in head]
    for message, reply in trains:
        assert set(reply.content["arrays"]) == set(message.content["arrays"])
        for key in head:  # the head goes back exactly as it came
            assert reply.content["arrays"][key].data == message.content["arrays"][key].data
        assert any(  # the body trained
            reply.content["arrays"][k].data != message.content["arrays"][k].data for k in body
        )
    kept = _nodes_personal(tmp_path / "fedper", "personal-fedper")
    assert sorted(kept) == [1, 2, 3, 4] and all(set(s) == set(head) for s in kept.values())
    final = RunStore.open(tmp_path / "fedper").latest_valid()[0].arrays
    first = trains[0][0].content["arrays"]
    for key in head:  # the server's head is never trained: it is the initial one
        assert np.array_equal(to_numpy(final[key]), to_numpy(first[key]))
        assert all(not np.array_equal(s[key], to_numpy(first[key])) for s in kept.values())
    assert all("personal" in site for site in history[-1]["sites"].values())
    assert all(set(r.content.keys()) == {"metrics", "site"} for r in evaluations)


def test_fedper_is_refused_for_a_model_with_one_layer(tmp_path):
    from fedml.errors import FedmlError

    cfg = load_config(None, {**HEART, "client.personal": "fedper", "out": str(tmp_path / "x")})
    with pytest.raises(FedmlError, match=r"only one layer.*--model mlp"):
        Experiment.prepare(cfg)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"client.personal": "perfedavg"}, "client.personal 'perfedavg' is unknown"),
        ({"client.personal": "ditto", "dp.mode": "sample"}, "not available with dp.mode"),
        ({"client.personal": "ditto", "client.fine_tune_epochs": 2}, "choose one"),
        ({"client.ditto_lambda": -1.0}, r"client\.ditto_lambda must be 0 \.\. 100"),
        ({"client.ditto_lambda": float("nan")}, r"client\.ditto_lambda must be"),
    ],
)
def test_personal_settings_that_cannot_work_are_one_clear_error(overrides, fragment):
    from fedml.errors import FedmlError

    with pytest.raises(FedmlError, match=fragment):
        load_config(None, overrides)


def test_a_data_sites_personal_model_outlives_a_restart_and_belongs_to_one_experiment(tmp_path):
    """At a deployed site the personal state is a file in its state folder, named after
    the experiment: a restarted SuperNode (an empty Context) finds it, another
    experiment does not."""
    import torch
    from flwr.app import Context, RecordDict

    from clients import personal
    from fedml.node_state import SITE_STATE_KEY

    def context() -> Context:
        node = {SITE_STATE_KEY: str(tmp_path / "fedml-site-x")}
        return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})

    cfg = load_config(None, {**HEART, "client.personal": "ditto"})
    state = {"linear.weight": torch.arange(6.0).reshape(2, 3), "linear.bias": torch.ones(2)}
    personal.save(context(), cfg, state)
    again = personal.load(context(), cfg)
    assert again is not None and all(torch.equal(again[k], v) for k, v in state.items())
    assert [p.name.split("-")[:2] for p in (tmp_path / "fedml-site-x").iterdir()] == [
        ["personal", "ditto"]
    ]
    other = load_config(None, {**HEART, "client.personal": "ditto", "client.lr": 0.5})
    assert personal.load(context(), other) is None
