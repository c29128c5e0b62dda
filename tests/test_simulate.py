"""End to end: `simulate` runs, writes the documented run directory, and is deterministic."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedml.config import load_config
from fedml.data import load_federation
from fedml.errors import FedmlError
from simulations.engine import simulate

HISTORY_KEYS = {"round", "train", "evaluate", "server", "clients", "seconds"}


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def _without_time(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_default_run_reaches_90_percent_on_digits(tmp_path):
    cfg = load_config(None, {"out": str(tmp_path / "run")})
    summary = simulate(cfg)
    assert summary.rounds == 20
    assert summary.final["server"]["accuracy"] >= 0.90
    rows = _rows(tmp_path / "run")
    assert len(rows) == 20 and [r["round"] for r in rows] == list(range(1, 21))
    for row in rows:
        assert set(row) >= HISTORY_KEYS
        assert set(row["train"]) >= {"loss", "num-examples"}
        assert set(row["evaluate"]) >= {"loss", "accuracy", "num-examples"}
        assert set(row["server"]) == {"loss", "accuracy"}
        assert row["clients"] == {
            "sampled": 10,
            "replied": 10,
            "failed": 0,
            "declined": 0,
            "dropped": 0,
            "timed_out": 0,
            "rejected": 0,
            "stragglers": 0,
            "aggregated": 10,
        }
        assert row["rejected"] == {}
    assert rows[0]["train"]["num-examples"] == 1150  # 80% of the 1437 training digits
    assert load_config(tmp_path / "run" / "config.toml") == cfg
    model = load_file(tmp_path / "run" / "model.safetensors")
    assert set(model) == {"1.weight", "1.bias", "3.weight", "3.bias"}  # torch names


def test_same_seed_same_history_and_bit_identical_model(tmp_path, small_overrides):
    outputs = []
    for name in ("a", "b"):
        cfg = load_config(
            None,
            {
                **small_overrides,
                "strategy.fraction_train": 0.5,
                "simulation.stragglers": 0.5,
                "out": str(tmp_path / name),
            },
        )
        simulate(cfg)
        outputs.append(tmp_path / name)
    a, b = outputs
    assert _without_time(_rows(a)) == _without_time(_rows(b))
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    cfg = load_config(None, {**small_overrides, "seed": 1, "out": str(tmp_path / "c")})
    simulate(cfg)
    assert _without_time(_rows(tmp_path / "c")) != _without_time(_rows(a))


@pytest.mark.parametrize(("strategy", "aggregated"), [("fedavg", 2), ("fedprox", 4)])
def test_fedavg_drops_stragglers_fedprox_keeps_them(
    tmp_path, small_overrides, strategy, aggregated
):
    cfg = load_config(
        None,
        {
            **small_overrides,
            "strategy.name": strategy,
            "simulation.stragglers": 0.5,
            "client.local_epochs": 3,
        },
    )
    summary = simulate(cfg)
    for row in summary.history:
        assert row["clients"]["stragglers"] == 2
        assert row["clients"]["aggregated"] == aggregated


def test_synthetic_with_fedprox(tmp_path, small_overrides):
    cfg = load_config(
        None,
        {
            **small_overrides,
            "data.dataset": "synthetic:0.5,0.5",
            "model.name": "logreg",
            "strategy.name": "fedprox",
            "simulation.clients": 6,
            "client.lr": 0.01,
            "client.momentum": 0.0,
            "rounds": 3,
        },
    )
    rows = simulate(cfg).history
    assert rows[-1]["train"]["loss"] < rows[0]["train"]["loss"]


def test_integer_buffers_survive_end_to_end(tmp_path, small_overrides, monkeypatch):
    (tmp_path / "bn_models.py").write_text(
        textwrap.dedent("""
        import torch
        def bn_mlp(input_shape, num_classes):
            return torch.nn.Sequential(
                torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32),
                torch.nn.ReLU(), torch.nn.Linear(32, num_classes))
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(None, {**small_overrides, "model.name": "bn_models:bn_mlp"})
    simulate(cfg)
    model = load_file(tmp_path / "run" / "model.safetensors")
    tracked = model["2.num_batches_tracked"]
    assert tracked.dtype == np.int64
    assert tracked > 0
    assert model["2.running_mean"].dtype == np.float32


def test_npz_shard_directory_end_to_end(tmp_path, small_overrides):
    fed = load_federation("digits", "iid", 3, 0.2, 0)
    data = tmp_path / "shards"
    data.mkdir()
    for i in range(3):
        np.savez(data / f"client-{i}.npz", x=fed.client(i).x, y=fed.client(i).y)
    np.savez(data / "test.npz", x=fed.test.x, y=fed.test.y)
    cfg = load_config(
        None,
        {**small_overrides, "data.dataset": f"npz:{data}", "simulation.clients": 3, "rounds": 3},
    )
    summary = simulate(cfg)
    assert summary.final["server"]["accuracy"] > 0.6


def test_failing_clients_are_counted_not_fatal(tmp_path, small_overrides, monkeypatch):
    import clients.app as client_module

    original = client_module.LocalJob.from_context.__func__

    def flaky(cls, context):
        if context.node_config["partition-id"] == 0:
            raise OSError("site 0 lost its disk")
        return original(cls, context)

    monkeypatch.setattr(client_module.LocalJob, "from_context", classmethod(flaky))
    summary = simulate(load_config(None, small_overrides))
    for row in summary.history:
        assert row["clients"]["failed"] == 1 and row["clients"]["aggregated"] == 3


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"model.name": "no_such_module:factory"}, "cannot be imported"),
        ({"model.name": "cnn", "data.dataset": "breast-cancer"}, "needs image data"),
        ({"strategy.name": "fedsgd"}, "Unknown strategy 'fedsgd'"),
        ({"data.partition": "shards:500"}, "needs 2000 shards"),
    ],
)
def test_user_errors_surface_before_the_run_directory_exists(
    tmp_path, small_overrides, overrides, fragment
):
    with pytest.raises(FedmlError, match=fragment):
        simulate(load_config(None, {**small_overrides, **overrides}))
    assert not (tmp_path / "run").exists()


def test_an_existing_run_directory_is_never_overwritten(tmp_path, small_overrides):
    cfg = load_config(None, small_overrides)
    simulate(cfg)
    before = (tmp_path / "run" / "history.jsonl").read_bytes()
    with pytest.raises(FedmlError, match="already holds a run"):
        simulate(cfg)
    assert (tmp_path / "run" / "history.jsonl").read_bytes() == before
