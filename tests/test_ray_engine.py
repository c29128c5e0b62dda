"""The Ray engine: Flower's Simulation Runtime playing the same rounds as the in-process
engine, and `SimulatedNodesGrid`, which makes that so (node numbering, node state)."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedml.config import load_config
from fedml.deploy.launch import superlink_run
from fedml.errors import FedmlError
from fedml.node_state import STATE_MARKER, STATE_PREFIX, carry_node_state
from fedml.runstore import RunStore, is_locked, open_resume, read_history
from fedml.server import Experiment, run_experiment
from simulations.engine import simulate
from simulations.flower_internals import claim_server_identity
from simulations.inprocess import InProcessGrid
from simulations.virtual_nodes import SimulatedNodesGrid

pytestmark = pytest.mark.xdist_group("ray")  # one Ray cluster at a time (pyproject addopts)


class FlowerLikeGrid(InProcessGrid):
    """What Flower's Simulation Runtime looks like to a ServerApp: random node IDs that
    do not sort in partition order, and (as after a restart) no node state kept between
    messages."""

    def __init__(self, client_app, num_nodes: int, run_config: dict) -> None:
        super().__init__(client_app, num_nodes, run_config)
        flower_ids = random.Random(7).sample(range(10**9, 10**10), num_nodes)
        self.contexts = dict(zip(flower_ids, self.contexts.values(), strict=True))

    def _deliver(self, message: Message) -> Message:
        reply = super()._deliver(message)
        self.contexts[message.metadata.dst_node_id].state = RecordDict()
        return reply


def _in_process_and_simulated(tmp_path, overrides: dict) -> tuple[list[dict], list[dict]]:
    """The histories of one run on the in-process grid and on the Ray engine's grid
    (Flower-like node IDs, no node state kept), in that order."""
    reference = _play(
        load_config(None, {**overrides, "out": str(tmp_path / "inprocess")}),
        lambda app, cfg: InProcessGrid(app, cfg.simulation.clients, cfg.to_flat()),
    )
    history = _play(
        load_config(None, {**overrides, "out": str(tmp_path / "sim")}),
        lambda app, cfg: SimulatedNodesGrid(
            FlowerLikeGrid(app, cfg.simulation.clients, cfg.to_flat()), cfg.simulation.clients
        ),
    )
    return reference, history


def _play(cfg, grid_for) -> list[dict]:
    from clients.app import app as client_app

    experiment = Experiment.prepare(cfg)
    store = RunStore.create(Path(cfg.out), cfg)
    grid = grid_for(client_app, cfg)
    return run_experiment(grid, experiment, store).history


def test_simulated_nodes_play_the_in_process_rounds_with_state_carried(tmp_path):
    """DP-SGD clients, half of them sampled per round: the wrapped Flower-like grid
    samples the same clients, and every client's privacy ledger survives a runtime that
    forgets node state, so the histories (epsilons included) are identical."""
    overrides = {
        "rounds": 3,
        "simulation.clients": 6,
        "strategy.fraction_train": 0.5,
        "dp.mode": "sample",
        "dp.noise_multiplier": 1.0,
    }
    reference = _play(
        load_config(None, {**overrides, "out": str(tmp_path / "inprocess")}),
        lambda app, cfg: InProcessGrid(app, cfg.simulation.clients, cfg.to_flat()),
    )
    wrapped: list[SimulatedNodesGrid] = []

    def simulated(app, cfg):
        inner = FlowerLikeGrid(app, cfg.simulation.clients, cfg.to_flat())
        order = [ctx.node_config["partition-id"] for _, ctx in sorted(inner.contexts.items())]
        assert order != sorted(order)  # Flower's IDs do not sort in partition order
        wrapped.append(SimulatedNodesGrid(inner, cfg.simulation.clients))
        return wrapped[0]

    history = _play(load_config(None, {**overrides, "out": str(tmp_path / "sim")}), simulated)
    assert history == [{**row, "seconds": history[i]["seconds"]} for i, row in enumerate(reference)]
    assert history[-1]["privacy"]["epsilon_max"] > history[0]["privacy"]["epsilon_max"]
    assert all(row["devices"] == {"cpu": row["clients"]["replied"]} for row in history)
    states = wrapped[0].node_states()
    assert set(states) <= set(range(1, 7)) and len(states) >= 3  # the sampled clients' ledgers
    assert all("privacy-ledger" in state for state in states.values())


def test_secure_rounds_on_simulated_nodes_equal_the_in_process_ones(tmp_path):
    """Secure aggregation through the Ray engine's grid: the sites learn the server's
    node IDs from the messages (not Flower's), their round secrets travel as node state
    between the four exchanges, and the rounds equal the in-process engine's."""
    overrides = {"rounds": 2, "simulation.clients": 5, "secagg.enabled": True}

    def without_times(history):
        return [{**row, "seconds": 0, "secagg": {**row["secagg"], "seconds": 0}} for row in history]

    reference, history = _in_process_and_simulated(tmp_path, overrides)
    assert without_times(history) == without_times(reference)
    assert history[-1]["secagg"]["unmasked"] == 5


def test_hospital_statistics_and_site_results_on_simulated_nodes_equal_the_in_process_ones(
    tmp_path,
):
    """The feature-statistics query and the per-site evaluation through the Ray
    engine's grid (Flower's node IDs): the same standardisation, the same sites under
    the same names, the same rounds (`fedml simulate --engine ray` was run too)."""
    overrides = {"rounds": 2, "data.dataset": "fed-heart-disease", "model.name": "logreg"}
    reference, history = _in_process_and_simulated(tmp_path, overrides)
    assert history == [{**row, "seconds": history[i]["seconds"]} for i, row in enumerate(reference)]
    assert history[0]["preprocess"] == {"standardized": 13, "sites": 4, "rows": 389}
    assert list(history[-1]["sites"]) == ["cleveland", "hungary", "switzerland", "va-long-beach"]


def test_a_runtime_whose_clients_do_not_identify_is_a_clear_error():
    stock = ClientApp()  # no query handler: not fedml's ClientApp

    @stock.train()
    def train(msg, context):
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    grid = SimulatedNodesGrid(InProcessGrid(stock, 3, {}), 3, wait=5)
    with pytest.raises(FedmlError, match=r"did not identify as clients 0\.\.2 \(0 answered\)"):
        grid.get_node_ids()


def test_carry_node_state_sets_the_context_and_returns_its_state():
    claim_server_identity(1)
    seen: list[RecordDict] = []

    def app(message: Message, context: Context) -> Message:
        seen.append(context.state)
        assert STATE_MARKER not in message.content  # the app sees a clean message
        context.state["counter"] = ConfigRecord({"n": 2})
        return Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=message)

    def context() -> Context:
        return Context(1, 1, {"partition-id": 0}, RecordDict({"old": ConfigRecord()}), {})

    plain = Message(RecordDict(), 1, MessageType.TRAIN)
    reply = carry_node_state(plain, context(), app)
    assert "old" in seen[-1] and STATE_MARKER not in reply.content  # passed through

    carrying = RecordDict(
        {STATE_MARKER: ConfigRecord(), STATE_PREFIX + "counter": ConfigRecord({"n": 1})}
    )
    reply = carry_node_state(Message(carrying, 1, MessageType.TRAIN), context(), app)
    assert set(seen[-1]) == {"counter"}  # the carried state replaced the node's own
    assert reply.content[STATE_PREFIX + "counter"]["n"] == 2
    assert STATE_MARKER in reply.content and "metrics" in reply.content


def test_engine_options_are_checked_and_reach_flowers_federation_config(monkeypatch, tmp_path):
    from simulations import ray_engine

    cfg = load_config(
        None, {"simulation.clients": 12, "simulation.num_cpus": 2, "simulation.num_gpus": 0.25}
    )
    assert ray_engine.federation_config(cfg) == (
        "num-supernodes=12 client-resources-num-cpus=2 client-resources-num-gpus=0.25"
    )
    with pytest.raises(FedmlError, match=r"simulation\.num_gpus"):
        load_config(None, {"simulation.num_gpus": -1})
    with pytest.raises(FedmlError, match=r"simulation\.num_cpus"):
        load_config(None, {"simulation.num_cpus": 0})
    with pytest.raises(FedmlError, match=r"simulation\.engine .dask. is unknown"):
        load_config(None, {"simulation.engine": "dask"})

    joined = load_config(None, {"simulation.ray_address": "ray://head:10001"})
    with superlink_run("fedml-test-", tmp_path, ray_engine.ray_env(joined)) as link:
        assert link.env["RAY_ADDRESS"] == "ray://head:10001"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with superlink_run("fedml-test-", tmp_path, ray_engine.ray_env(cfg)) as link:
        assert "RAY_ADDRESS" not in link.env
        assert link.env["RAY_USAGE_STATS_ENABLED"] == "0"  # Ray phones home otherwise
        assert link.env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert not link.work.exists()  # the work folder goes with the run

    busy = tmp_path / "busy"
    simulate(load_config(None, {"rounds": 1, "simulation.clients": 2, "out": str(busy)}))
    holder = RunStore.open(busy)
    holder.resume(holder.cfg)  # this process now writes the run
    try:
        store, resumed = open_resume(busy, {"rounds": 2, "simulation.engine": "ray"})
        with pytest.raises(FedmlError, match="in use by another fedml process"):
            simulate(resumed, resume=store)
    finally:
        holder.close()

    monkeypatch.setattr(ray_engine.importlib.util, "find_spec", lambda name: None)
    ray_cfg = load_config(None, {"simulation.engine": "ray", "out": str(tmp_path / "run")})
    with pytest.raises(FedmlError, match=r"pip install 'fedml-sites\[ray\]'"):
        simulate(ray_cfg)
    assert not (tmp_path / "run").exists()


requires_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="the Ray engine needs flwr[simulation]"
)


def _rows_close(ours: list[dict], reference: list[dict]) -> None:
    """Same rounds, clients and metrics to float tolerance (Ray actors run PyTorch with
    one thread each, so sums may round differently)."""
    assert len(ours) == len(reference)
    for row, ref in zip(ours, reference, strict=True):
        assert row["round"] == ref["round"] and row["clients"] == ref["clients"]
        for part in ("train", "evaluate", "server"):
            for key, value in ref[part].items():
                assert math.isclose(row[part][key], value, rel_tol=1e-5), (part, key)


@pytest.mark.slow
@requires_ray
def test_ray_engine_matches_the_in_process_history(tmp_path):
    """The acceptance run: 8 clients, 3 rounds, half the clients sampled each round."""
    overrides = {"rounds": 3, "simulation.clients": 8, "strategy.fraction_train": 0.5}
    reference = simulate(load_config(None, {**overrides, "out": str(tmp_path / "inprocess")}))
    cfg = load_config(None, {**overrides, "simulation.engine": "ray", "out": str(tmp_path / "ray")})
    rounds_seen: list[int] = []
    summary = simulate(cfg, on_round=lambda row: rounds_seen.append(row["round"]))
    assert rounds_seen == [1, 2, 3]
    assert summary.stop_reason == "max rounds" and summary.run_dir == tmp_path / "ray"
    _rows_close(summary.history, reference.history)
    superlink_log = (tmp_path / "ray" / "logs" / "superlink.log").read_text()
    # it returned once the run directory said the run was over, before Flower's own
    # shutdown: what Flower still ran was stopped. Its SuperLink's port names them (the
    # SuperExec, flwr-simulation); Ray's processes share flwr-simulation's group.
    port = re.search(r"API on 127\.0\.0\.1:(\d+)", superlink_log).group(1)
    assert [p for p in _ray_processes() if f"127.0.0.1:{port} " in p + " "] == []


@pytest.mark.slow
@requires_ray
def test_a_ray_run_resumes_with_its_clients_privacy_ledgers(tmp_path):
    """DP-SGD on Ray for 2 rounds, then `--resume` to 3: the clients' ledgers come back
    from the run store, so round 3 (its epsilons too) is the uninterrupted run's."""
    overrides = {
        "simulation.clients": 4,
        "strategy.fraction_train": 0.5,
        "dp.mode": "sample",
        "dp.noise_multiplier": 1.0,
    }
    reference = simulate(
        load_config(None, {**overrides, "rounds": 3, "out": str(tmp_path / "inprocess")})
    )
    run = tmp_path / "ray"
    first = {**overrides, "rounds": 2, "simulation.engine": "ray", "out": str(run)}
    simulate(load_config(None, first))
    store, cfg = open_resume(run, {"rounds": 3})
    summary = simulate(cfg, resume=store)
    assert summary.resumed_from == 2 and summary.stop_reason == "max rounds"
    _rows_close(summary.history, reference.history)
    for row, ref in zip(summary.history, reference.history, strict=True):
        assert math.isclose(
            row["privacy"]["epsilon_max"], ref["privacy"]["epsilon_max"], rel_tol=1e-9
        )


def _ray_processes() -> list[str]:
    """Command lines of live processes that only the Ray engine starts."""
    from fedml.deploy.processes import _process_table

    found = []
    for pid in _process_table():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(name in command for name in ("ray::", "raylet", "gcs_server", "flwr-simulation")):
            found.append(command)
    return found


@pytest.mark.slow
@requires_ray
def test_ctrl_c_stops_ray_entirely_and_the_run_continues_in_process(tmp_path):
    """Ctrl-C during a Ray run: exit 130 naming the resume command, no Ray process left
    behind, and the run continues on the in-process engine where it stopped."""
    run = tmp_path / "run"
    # So many rounds that the run cannot end by itself while the test waits.
    command = [
        sys.executable, "-m", "fedml.cli", "simulate", "--engine", "ray", "--clients", "4",
        "--rounds", "100000", "--out", str(run), "--no-report",
    ]  # fmt: skip
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not read_history(run):
            assert time.monotonic() < deadline and process.poll() is None, "no round in time"
            time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        try:
            _, stderr = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("fedml simulate --engine ray did not stop within 120 s of Ctrl-C")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr[-3000:]
    assert f"fedml simulate --resume {run}" in " ".join(stderr.split())
    deadline = time.monotonic() + 30
    while _ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _ray_processes() == []
    assert not is_locked(run)

    done = len(read_history(run))
    store, cfg = open_resume(run, {"simulation.engine": "inprocess", "rounds": done + 2})
    summary = simulate(cfg, resume=store)
    assert summary.resumed_from is not None and summary.resumed_from <= done
    rounds = [row["round"] for row in read_history(run)]
    assert rounds == list(range(1, done + 3))
