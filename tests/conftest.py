"""Shared fixtures: small, fast configs and an isolated environment."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """Workers for `-n auto` (pyproject's addopts): one per core this process may use, at
    most 4. Many tests start servers, sites or Ray clusters of their own: more workers
    than cores would only make them wait for each other."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


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
