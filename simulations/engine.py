"""Run a config on the chosen engine: the one function `fedml simulate` calls."""

from __future__ import annotations

from pathlib import Path

from fedml.config import RunConfig
from fedml.runstore import RunDir, default_run_path
from fedml.server import Experiment, RoundCallback, RunSummary, run_experiment


def simulate(cfg: RunConfig, on_round: RoundCallback | None = None) -> RunSummary:
    """Run `cfg` with the in-process engine and write its run directory."""
    from clients.app import app as client_app
    from simulations.inprocess import InProcessGrid

    experiment = Experiment.prepare(cfg)  # user errors surface before anything is written
    run_dir = RunDir.create(Path(cfg.out) if cfg.out else default_run_path(), cfg)
    grid = InProcessGrid(client_app, cfg.simulation.clients, cfg.to_flat())
    return run_experiment(grid, experiment, run_dir, on_round=on_round)
