"""Whole runs on a CUDA GPU: the in-process engine with DP off and on, a device index,
and the Ray engine with four clients sharing one GPU. Skipped without CUDA (CI has none);
run them on a GPU machine with `pytest -q tests/test_gpu.py`, or with the run kit
`bench/gpu/run.sh` (DEVELOPERS.md)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from clients.trainer import resolve_device
from fedml.config import load_config
from fedml.errors import FedmlError
from simulations.engine import simulate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _trained_on_cuda(history: list[dict]) -> bool:
    """Every round's every training reply says it trained on a CUDA device."""
    return all(
        sum(row["devices"].values()) == row["clients"]["replied"]
        and all(label.startswith("cuda") for label in row["devices"])
        for row in history
    )


@pytest.mark.parametrize("dp", ["off", "sample"])
def test_in_process_run_trains_every_client_on_the_gpu(tmp_path, dp):
    cfg = load_config(
        None,
        {"rounds": 2, "simulation.clients": 4, "client.device": "cuda", "dp.mode": dp,
         "out": str(tmp_path / "run")},
    )  # fmt: skip
    summary = simulate(cfg)
    assert _trained_on_cuda(summary.history)
    assert summary.history[-1]["server"]["accuracy"] > 0.3
    assert ("privacy" in summary.history[-1]) == (dp == "sample")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs flwr[simulation]")
@pytest.mark.xdist_group("ray")  # one Ray cluster at a time (pyproject addopts)
def test_ray_engine_shares_one_gpu_between_four_clients(tmp_path):
    cfg = load_config(
        None,
        {"rounds": 2, "simulation.clients": 8, "simulation.engine": "ray",
         "simulation.num_gpus": 0.25, "client.device": "cuda", "out": str(tmp_path / "run")},
    )  # fmt: skip
    summary = simulate(cfg)
    assert summary.stop_reason == "max rounds"
    assert _trained_on_cuda(summary.history)


def test_a_device_index_trains_on_that_gpu_and_one_past_the_last_is_refused(tmp_path):
    cfg = load_config(
        None,
        {"rounds": 1, "simulation.clients": 2, "client.device": "cuda:0",
         "out": str(tmp_path / "run")},
    )  # fmt: skip
    summary = simulate(cfg)
    assert {label.split()[0] for label in summary.history[-1]["devices"]} == {"cuda:0"}
    past = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(FedmlError, match=f"has {torch.cuda.device_count()} CUDA device"):
        resolve_device(past)
