"""The built-in catalog of Flower strategies in fedml's loop: runs, state, kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from commit_compare import same_commit
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from safetensors.numpy import load_file

from fedml.config import load_config
from fedml.errors import FedmlError
from fedml.server import Experiment
from simulations.engine import simulate
from simulations.flower_internals import claim_server_identity
from simulations.inprocess import InProcessGrid
from strategies import available, build_strategy
from strategies.catalog import CATALOG, FedAdam, FedMedian

STATEFUL = {
    "fedavgm": {"strategy.server_momentum": 0.9},
    "fedadam": {},
    "fedyogi": {},
    "fedadagrad": {},
}
KILLER = str(Path(__file__).with_name("killer.py"))
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
FEDML = [sys.executable, "-m", "fedml.cli"]


def test_the_catalog_is_registered_and_listed():
    names = available()
    for name in CATALOG:
        assert names[name].origin == "built-in"
        assert names[name].load().__module__ == "strategies.catalog"


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_catalog_strategy_runs_two_rounds_of_digits(tmp_path, name):
    cfg = load_config(
        None,
        {
            "rounds": 2,
            "simulation.clients": 4,
            "client.local_epochs": 1,
            "strategy.name": name,
            **STATEFUL.get(name, {}),
            "out": str(tmp_path / "run"),
        },
    )
    summary = simulate(cfg)
    assert summary.rounds == 2 and summary.stop_reason == "max rounds"
    assert all(row["clients"]["aggregated"] == 4 for row in summary.history)
    assert summary.final["server"]["accuracy"] > 0.15  # learned something over chance
    initial = Experiment.prepare(cfg).evaluator.model.state_dict()
    final = load_file(tmp_path / "run" / "model.safetensors")
    assert {k: v.dtype for k, v in final.items()} == {
        k: v.numpy().dtype for k, v in initial.items()
    }
    assert any(not np.array_equal(final[k], initial[k].numpy()) for k in final)


def _args(out: Path, name: str) -> list[str]:
    args = ["simulate", "--rounds", "4", "--clients", "4", "--fraction-train", "0.5",
            "--local-epochs", "1", "--strategy", name, "--seed", "3",
            "--out", str(out)]  # fmt: skip
    if name == "fedavgm":
        config = out.parent / "fedavgm.toml"
        config.write_text('[strategy]\nname = "fedavgm"\nserver_momentum = 0.9\n')
        args.insert(1, str(config))
    return args


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_stateful_catalog_strategies_resume_bit_identically_after_sigkill(tmp_path, name):
    straight = subprocess.run(
        [*FEDML, *_args(tmp_path / "straight", name)], env=ENV, capture_output=True, timeout=300
    )
    assert straight.returncode == 0, straight.stderr
    # SIGKILL the run right after round 2's history row is written, then resume it
    killed = subprocess.run(
        [sys.executable, KILLER, "fedml.runstore.writer:RunStore._append_history", "2", "after",
         "--", *_args(tmp_path / "resumed", name)],
        env=ENV, capture_output=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = subprocess.run(
        [*FEDML, "simulate", "--resume", str(tmp_path / "resumed")],
        env=ENV,
        capture_output=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert _rows(b) == _rows(a)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert same_commit(a / "commits" / "round-000004", b / "commits" / "round-000004")
    state = json.loads((b / "commits" / "round-000004" / "state.json").read_text())
    assert state["components"]["strategy"]["v_t" if name != "fedavgm" else "momentum_vector"]


# ------------------------------------------------------------------------ adapter units
def _reply(node: int, value: float, n: int = 10) -> Message:
    claim_server_identity(1)
    request = Message(RecordDict(), node, "train")
    request.metadata.__dict__["_message_id"] = f"q{node}"
    arrays = ArrayRecord(
        {
            "w": Array(np.full(3, value, dtype=np.float32)),
            "steps": Array(np.array([node], dtype=np.int64)),
        }
    )
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})})
    return Message(content, reply_to=request)


def _global() -> ArrayRecord:
    return ArrayRecord(
        {"w": Array(np.zeros(3, dtype=np.float32)), "steps": Array(np.array([0], dtype=np.int64))}
    )


def _grid():
    return InProcessGrid(lambda m, c: m, num_nodes=3, run_config={})


def test_aggregates_keep_the_global_models_dtypes():
    strategy = FedMedian(seed=0, min_available_nodes=1)
    list(strategy.configure_train(1, _global(), ConfigRecord(), _grid()))
    arrays, _ = strategy.aggregate_train(1, [_reply(1, 1.0), _reply(2, 2.0), _reply(3, 4.0)])
    assert arrays["w"].numpy().dtype == np.float32
    steps = arrays["steps"].numpy()
    assert steps.dtype == np.int64 and steps.tolist() == [2]


def test_a_discarded_attempt_leaves_the_optimiser_state_as_it_was():
    strategy = FedAdam(seed=0, min_available_nodes=1)
    list(strategy.configure_train(1, _global(), ConfigRecord(), _grid()))
    strategy.aggregate_train(1, [_reply(1, 1.0), _reply(2, 1.0)])
    after_round_1 = {k: v.copy() for k, v in strategy.m_t.items()}
    list(strategy.configure_train(2, _global(), ConfigRecord(), _grid()))
    strategy.aggregate_train(2, [_reply(1, 100.0), _reply(2, 100.0)])  # a diverged attempt
    assert not np.array_equal(strategy.m_t["w"], after_round_1["w"])
    strategy.discard_attempt()
    assert np.array_equal(strategy.m_t["w"], after_round_1["w"])


def test_the_optimiser_reference_is_the_global_model_each_round():
    strategy = FedAdam(seed=0, min_available_nodes=1)
    moved = ArrayRecord(
        {"w": Array(np.full(3, 7.0, dtype=np.float32)), "steps": Array(np.array([0]))}
    )
    list(strategy.configure_train(3, moved, ConfigRecord(), _grid()))
    assert strategy.current_arrays["w"].tolist() == [7.0, 7.0, 7.0]


def test_catalog_options_come_from_the_strategy_table():
    cfg = load_config(None, {"strategy.name": "fedtrimmedavg", "strategy.beta": 0.1})
    assert build_strategy(cfg).beta == 0.1
    krum = load_config(None, {"strategy.name": "krum", "strategy.num_malicious_nodes": 1})
    assert build_strategy(krum).num_malicious_nodes == 1


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"strategy.num_malicious_nodes": -5}, "num_malicious_nodes for 'krum' must be a whole"),
        ({"strategy.num_malicious_nodes": 1.5}, "must be a whole number >= 0"),
        ({"strategy.min_train_nodes": float("nan")}, "min_train_nodes must be a finite number"),
        ({"strategy.num_malicious_nodes": True}, "must be a whole number >= 0"),
    ],
)
def test_catalog_options_are_checked_before_the_run_starts(options, fragment):
    with pytest.raises(FedmlError, match=fragment):
        build_strategy(load_config(None, {"strategy.name": "krum", **options}))


def test_a_non_finite_option_or_config_value_is_refused():
    with pytest.raises(FedmlError, match=r"client\.weight_decay must be a finite number"):
        load_config(None, {"client.weight_decay": float("inf")})


@pytest.mark.parametrize(
    ("name", "malicious", "clients", "needed"),
    [("krum", 50, 3, 103), ("multikrum", 1, 4, 5), ("bulyan", 1, 6, 7)],
)
def test_a_byzantine_count_the_federation_cannot_outvote_is_refused(
    name, malicious, clients, needed
):
    """Issue 34: krum with num_malicious_nodes = 50 and 3 clients was accepted."""
    cfg = load_config(
        None,
        {
            "strategy.name": name, "strategy.num_malicious_nodes": malicious,
            "simulation.clients": clients, "strategy.min_train_clients": 2,
            "strategy.min_evaluate_clients": 2,
        },
    )  # fmt: skip
    with pytest.raises(FedmlError, match=f"needs at least {needed} clients a round"):
        build_strategy(cfg)
    enough = load_config(None, {**cfg.to_flat(), "simulation.clients": needed})
    assert build_strategy(enough).num_malicious_nodes == malicious
