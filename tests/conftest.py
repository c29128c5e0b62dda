"""Shared fixtures: small, fast configs and an isolated environment."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def _cores() -> int:
    """The cores this process may use (all of the machine's where that is not known)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist, each worker and every process its tests start size their
    thread pools (PyTorch's OpenMP, NumPy's BLAS) to their share of the cores. A pool as
    wide as the machine in each of N workers spins against the others (OpenMP threads
    busy-wait): a 2 s test took 45 s. Set before PyTorch is imported, which reads it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = str(max(1, _cores() // workers))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(name, share)


_share_the_cores_between_workers()


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """Workers for `-n auto` (pyproject's addopts): one per core this process may use, at
    most 4. Many tests start servers, sites or Ray clusters of their own: more workers
    than cores would only make them wait for each other."""
    return max(1, min(4, _cores()))


@pytest.fixture
def small_overrides(tmp_path):
    """A few quick rounds on digits with 4 clients."""
    return {
        "rounds": 2,
        "simulation.clients": 4,
        "client.local_epochs": 1,
        "out": str(tmp_path / "run"),
    }


from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run: CI is reproducible.
settings.register_profile("fedml", derandomize=True, deadline=None)
settings.load_profile("fedml")
