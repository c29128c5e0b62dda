"""SCAFFOLD: the server's control variate, the sites' own, and the corrected steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from replies import replies_from

from clients.kept_state import RECORD_PREFIX
from clients.scaffold import CONTROL_NAME
from clients.trainer import train_local
from fedml.arrays import from_numpy, record_of, to_numpy
from fedml.config import load_config
from fedml.data import Shard
from fedml.errors import FedmlError
from fedml.runstore import RunStore
from fedml.runstore.format import load_commit
from fedml.settings import CONTROL_RECORD, TrainSettings
from simulations.engine import simulate
from simulations.flower_internals import claim_server_identity
from strategies.scaffold import Scaffold

HEART = {"data.dataset": "fed-heart-disease", "model.name": "logreg", "client.momentum": 0.0}


def test_the_servers_control_variate_is_the_mean_of_the_sites_own(tmp_path):
    """The paper's invariant c = (1/N) sum_i c_i holds after every round, with half the
    sites sampled each round (the server computes its change from the updates alone;
    each site keeps c_i itself)."""
    cfg = load_config(
        None,
        {**HEART, "rounds": 4, "strategy.name": "scaffold", "strategy.fraction_train": 0.5,
         "checkpoint.keep": 10, "out": str(tmp_path / "run")},
    )  # fmt: skip
    history = simulate(cfg).history
    assert [row["clients"]["aggregated"] for row in history] == [2, 2, 2, 2]
    store = RunStore.open(tmp_path / "run")
    for commit in store.commit_dirs():  # every round's commit
        checkpoint = load_commit(tmp_path / "run", commit)
        server = checkpoint.state["strategy"]["control"]
        record = RECORD_PREFIX + CONTROL_NAME
        sites = [
            {k[2:]: to_numpy(a) for k, a in state.array_records[record].items() if k[:2] == "c/"}
            for state in checkpoint.node_states.values()
            if record in state.array_records
        ]
        assert 2 <= len(sites) <= 4  # sites never sampled keep c_i = 0 (nothing stored)
        assert set(server) == {"1.weight", "1.bias"}
        for key, c in server.items():
            mean = sum(site[key].astype(np.float64) for site in sites) / 4
            assert np.abs(c).max() > 1e-3  # it moved
            np.testing.assert_allclose(c, mean, rtol=1e-4, atol=1e-6)


def test_a_corrected_step_adds_c_minus_c_i_to_the_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    shard = Shard(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, np.array([0, 1, 1, 0]))
    settings = TrainSettings(local_epochs=1, batch_size=4, lr=0.5, momentum=0.0)
    plain = torch.nn.Linear(3, 2)
    plain.load_state_dict(model.state_dict())
    corrections = {"weight": torch.full((2, 3), 0.25), "bias": torch.tensor([1.0, -1.0])}
    train_local(model, shard, settings, torch.device("cpu"), torch.Generator().manual_seed(0),
                corrections=corrections)  # fmt: skip
    train_local(plain, shard, settings, torch.device("cpu"), torch.Generator().manual_seed(0))
    # one full-batch step each: the difference is exactly -lr x correction
    for name, value in corrections.items():
        moved = model.state_dict()[name] - plain.state_dict()[name]
        torch.testing.assert_close(moved, -0.5 * value)


def _round(strategy: Scaffold, model: dict[str, np.ndarray], sites: int = 4):
    claim_server_identity(1)  # messages are made as the run's server makes them

    class Grid:
        def get_node_ids(self):
            return list(range(1, sites + 1))

    config = ConfigRecord({"lr": 0.1, "local-epochs": 2, "batch-size": 10})
    arrays = record_of({k: from_numpy(v) for k, v in model.items()})
    return list(strategy.configure_train(1, arrays, config, Grid()))


def _replies(trained: list[dict[str, np.ndarray]], examples: list[int]) -> list[Message]:
    return replies_from(
        [
            RecordDict(
                {
                    "arrays": record_of({k: from_numpy(v) for k, v in arrays.items()}),
                    "metrics": MetricRecord({"num-examples": n}),
                }
            )
            for arrays, n in zip(trained, examples, strict=True)
        ]
    )


def test_the_server_moves_c_by_the_sampled_sites_share_of_their_drift():
    strategy = Scaffold(fraction_train=0.5, min_train_nodes=2, min_available_nodes=2)
    x = {"w": np.ones((2, 2), dtype=np.float32), "steps": np.array(3, dtype=np.int64)}
    messages = _round(strategy, x)
    assert len(messages) == 2
    assert set(messages[0].content[CONTROL_RECORD]) == {"w"}  # floating arrays only
    y = [np.full((2, 2), 0.5, np.float32), np.full((2, 2), 0.8, np.float32)]
    steps = np.array(5, np.int64)
    strategy.aggregate_train(1, iter(_replies([{"w": y[0], "steps": steps},
                                               {"w": y[1], "steps": steps}], [20, 5])))  # fmt: skip
    # K = 2 epochs x ceil(n / 10): 4 and 2 steps; drift (x - y) / (K lr)
    drifts = [(1 - 0.5) / (4 * 0.1), (1 - 0.8) / (2 * 0.1)]
    expected = (2 / 4) * np.mean(drifts)
    np.testing.assert_allclose(strategy.control["w"], np.full((2, 2), expected))

    before = {k: v.copy() for k, v in strategy.control.items()}
    messages = _round(strategy, x)
    np.testing.assert_allclose(to_numpy(messages[0].content[CONTROL_RECORD]["w"]), before["w"])
    strategy.aggregate_train(2, iter(_replies([{"w": y[0], "steps": x["steps"]}], [20])))
    assert not np.allclose(strategy.control["w"], before["w"])
    strategy.discard_attempt()  # the round loop rolled the attempt back
    np.testing.assert_array_equal(strategy.control["w"], before["w"])

    restored = Scaffold()
    restored.load_state_dict(strategy.state_dict())
    np.testing.assert_array_equal(restored.control["w"], before["w"])


def test_a_site_understating_its_examples_moves_c_no_more_than_the_drift_bound():
    """Claiming 1 example makes K = 2 steps where an honest site of 100 rows took 20:
    its drift term is 10x larger, and clipped to drift_factor x the median term."""
    x = {"w": np.zeros(4, dtype=np.float32)}
    results = {}
    for factor in (2.0, 1000.0):
        strategy = Scaffold(
            fraction_train=1.0, min_train_nodes=5, min_available_nodes=5, drift_factor=factor
        )
        _round(strategy, x, sites=5)
        trained = [{"w": np.full(4, -0.1, np.float32)} for _ in range(5)]
        strategy.aggregate_train(1, iter(_replies(trained, [100, 100, 100, 100, 1])))
        results[factor] = strategy.control["w"]
    # lr 0.1, 2 epochs of batch 10: K = 20 for 100 rows, 2 for the 1 claimed
    honest, liar = 0.1 / (20 * 0.1), 0.1 / (2 * 0.1)
    np.testing.assert_allclose(results[1000.0], (4 * honest + liar) / 5, rtol=1e-6)
    np.testing.assert_allclose(results[2.0], (4 * honest + 2 * honest) / 5, rtol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"client.momentum": 0.9}, "plain SGD steps"),
        ({"client.momentum": 0.0, "client.optimizer": "adam"}, "plain SGD steps"),
        ({"client.momentum": 0.0, "dp.mode": "sample"}, "not available with dp.mode 'sample'"),
        ({"client.momentum": 0.0, "dp.mode": "user-fixed"}, "not available with dp.mode"),
        ({"client.momentum": 0.0, "secagg.enabled": True}, "secure aggregation hides"),
        ({"client.momentum": 0.0, "validation.clip_norm": 5.0}, "validation.clip_norm"),
        ({"client.momentum": 0.0, "client.personal": "fedper"}, "own head"),
    ],
)
def test_scaffold_settings_that_cannot_work_are_one_clear_error(overrides, fragment):
    with pytest.raises(FedmlError, match=fragment):
        load_config(None, {"strategy.name": "scaffold", **overrides})


def test_a_site_keeps_its_control_variate_and_sends_only_the_model():
    from flwr.app import MessageType

    from clients import app as fedml_client
    from fedml.arrays import from_state_dict
    from fedml.models import model_for
    from simulations.inprocess import InProcessGrid

    cfg = load_config(None, {**HEART, "strategy.name": "scaffold"})
    grid = InProcessGrid(fedml_client.train, num_nodes=4, run_config=cfg.to_flat())
    model = model_for(cfg, (13,), 2)
    arrays = from_state_dict(model.state_dict())
    control = from_state_dict({k: torch.full_like(v, 0.01) for k, v in model.state_dict().items()})
    settings = TrainSettings(local_epochs=1, batch_size=32, lr=0.1, momentum=0.0)

    def config(server_round: int):
        record = settings.to_record(num_classes=2)
        record["server-round"] = server_round
        return record

    content = RecordDict({"arrays": arrays, "config": config(2), CONTROL_RECORD: control})
    message = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    (reply,) = grid.send_and_receive([message])
    assert set(reply.content.keys()) == {"arrays", "metrics", "device"}
    kept = grid.contexts[1].state.array_records[RECORD_PREFIX + CONTROL_NAME]
    assert int(to_numpy(kept["round"])) == 2
    # c_i+ = 0 - c + (x - y) / (K lr): recomputed from what the reply carries
    steps = -(-int(reply.content["metrics"]["num-examples"]) // 32)
    for key in arrays:
        x, y = to_numpy(arrays[key]), to_numpy(reply.content["arrays"][key])
        expected = -0.01 + (x.astype(np.float64) - y) / (steps * 0.1)
        np.testing.assert_allclose(to_numpy(kept[f"c/{key}"]), expected, rtol=1e-4, atol=1e-5)
        assert not to_numpy(kept[f"before/{key}"]).any()  # this round started from 0

    # the server retries round 2: the site starts again from the c_i it had before it
    again = Message(
        RecordDict({"arrays": arrays, "config": config(2), CONTROL_RECORD: control}),
        dst_node_id=1, message_type=MessageType.TRAIN,
    )  # fmt: skip
    (retried,) = grid.send_and_receive([again])
    for key in arrays:  # the same inputs, the same start, the same seed: the same update
        assert retried.content["arrays"][key].data == reply.content["arrays"][key].data
    # and round 3 starts from round 2's c_i+
    third = Message(
        RecordDict({"arrays": arrays, "config": config(3), CONTROL_RECORD: control}),
        dst_node_id=1, message_type=MessageType.TRAIN,
    )  # fmt: skip
    list(grid.send_and_receive([third]))  # a generator: the round runs as it is read
    kept_after_3 = grid.contexts[1].state.array_records[RECORD_PREFIX + CONTROL_NAME]
    assert int(to_numpy(kept_after_3["round"])) == 3
    for key in arrays:  # round 3 started from round 2's c_i+
        started = to_numpy(kept_after_3[f"before/{key}"])
        np.testing.assert_array_equal(started, to_numpy(kept[f"c/{key}"]))
