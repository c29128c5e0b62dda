"""Our strategies: seeded sampling, Flower's message conventions, FedProx's mu."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedml.config import load_config
from simulations.flower_internals import claim_server_identity
from simulations.inprocess import InProcessGrid
from simulations.scenarios import Stragglers
from strategies import FedAvg, FedProx, build_strategy


def _grid(n=10):
    return InProcessGrid(lambda m, c: m, num_nodes=n, run_config={})


def _arrays():
    return ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})


def test_messages_follow_flower_conventions():
    strategy = FedProx(proximal_mu=0.3, fraction_train=0.5, seed=1)
    messages = list(strategy.configure_train(4, _arrays(), ConfigRecord({"lr": 0.1}), _grid()))
    assert len(messages) == 5
    content = messages[0].content
    assert set(content.keys()) == {"arrays", "config"}
    assert content["config"]["server-round"] == 4
    assert content["config"]["proximal-mu"] == 0.3
    assert content["config"]["lr"] == 0.1
    fedavg = FedAvg(seed=1).configure_train(1, _arrays(), ConfigRecord(), _grid())
    assert "proximal-mu" not in next(iter(fedavg)).content["config"]


def test_sampling_is_seeded():
    def sampled(seed):
        strategy = FedAvg(fraction_train=0.3, seed=seed)
        grid = _grid(20)
        return [
            [
                m.metadata.dst_node_id
                for m in strategy.configure_train(r, _arrays(), ConfigRecord(), grid)
            ]
            for r in range(5)
        ]

    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)
    assert all(len(nodes) == 6 for nodes in sampled(7))


def test_sampling_state_round_trips():
    strategy = FedAvg(fraction_train=0.3, seed=3)
    grid = _grid(20)
    strategy.configure_train(1, _arrays(), ConfigRecord(), grid)
    state = strategy.state_dict()
    expected = [
        m.metadata.dst_node_id for m in strategy.configure_train(2, _arrays(), ConfigRecord(), grid)
    ]
    restored = FedAvg(fraction_train=0.3, seed=999)
    restored.load_state_dict(state)
    got = [
        m.metadata.dst_node_id for m in restored.configure_train(2, _arrays(), ConfigRecord(), grid)
    ]
    assert got == expected


def _reply(values, n, dtype=np.float32):
    claim_server_identity(1)
    request = Message(RecordDict(), 1, "train")
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.asarray(values, dtype=dtype))}),
            "metrics": MetricRecord({"loss": float(n), "num-examples": n}),
        }
    )
    return Message(content, reply_to=request)


def test_aggregate_train_is_example_weighted_and_skips_errors():
    from flwr.app import Error

    claim_server_identity(1)
    failed = Message(Error(code=2, reason="boom"), reply_to=Message(RecordDict(), 2, "train"))
    arrays, metrics = FedAvg().aggregate_train(1, [_reply([0, 0], 1), _reply([4, 8], 3), failed])
    np.testing.assert_allclose(arrays["w"].numpy(), [3, 6])
    assert metrics["loss"] == (1 * 1 + 3 * 3) / 4
    assert FedAvg().aggregate_train(1, [failed]) == (None, None)


def test_build_strategy_from_config():
    cfg = load_config(None, {"strategy.name": "fedprox", "strategy.proximal_mu": 0.5})
    strategy = build_strategy(cfg)
    assert isinstance(strategy, FedProx) and strategy.proximal_mu == 0.5
    assert strategy.min_train_nodes == 2


def test_stragglers_get_fewer_epochs_in_their_own_config():
    claim_server_identity(1)
    shared = RecordDict({"arrays": _arrays(), "config": ConfigRecord({"local-epochs": 20})})
    messages = [Message(shared, n, "train") for n in range(1, 11)]
    chosen = Stragglers(0.5, seed=0).apply(messages, full_epochs=20)
    assert len(chosen) == 5
    for message in messages:
        epochs = message.content["config"]["local-epochs"]
        if message.metadata.dst_node_id in chosen:
            assert 1 <= epochs <= 20
        else:
            assert epochs == 20
    assert shared["config"]["local-epochs"] == 20  # the shared record is untouched
    assert Stragglers(0.0, seed=0).apply(messages, 20) == set()


def test_stragglers_of_a_run_counted_in_steps_get_fewer_steps():
    claim_server_identity(1)
    config = ConfigRecord({"local-epochs": 2, "local-steps": 100})
    messages = [Message(RecordDict({"config": config}), n, "train") for n in range(1, 11)]
    chosen = Stragglers(0.5, seed=0).apply(messages, full_epochs=2, full_steps=100)
    steps = {m.metadata.dst_node_id: m.content["config"]["local-steps"] for m in messages}
    assert len(chosen) == 5 and all(1 <= steps[n] <= 100 for n in chosen)
    assert all(steps[n] == 100 for n in steps if n not in chosen)
    assert any(steps[n] < 100 for n in chosen)
    assert all(m.content["config"]["local-epochs"] == 2 for m in messages)


def test_a_round_waits_for_missing_nodes_only_so_long_then_samples_those_connected():
    """A deployed site that died never comes back: sampling must not wait forever for
    `min_train_nodes` (Flower's own wait is endless); it waits `node_wait`, then goes on
    with every connected node, and the participation rules judge the round."""
    import time

    grid = _grid(1)  # one site left of two
    strategy = FedAvg(min_train_nodes=2, min_evaluate_nodes=2, seed=0)
    strategy.node_wait = 1.5
    started = time.monotonic()
    nodes = [
        m.metadata.dst_node_id for m in strategy.configure_train(1, _arrays(), ConfigRecord(), grid)
    ]
    assert nodes == list(grid.get_node_ids())
    assert 1.5 <= time.monotonic() - started < 10
    empty = _grid(0)  # nobody connected: nothing sampled, the round fails by the rules
    assert list(strategy.configure_evaluate(1, _arrays(), ConfigRecord(), empty)) == []
