"""Run a config on the chosen engine: the one function `fedml simulate` calls."""

from __future__ import annotations

from pathlib import Path

from fedml.config import RunConfig
from fedml.runstore import RunDir, default_run_path
from fedml.server import RoundCallback, RunSummary, run_experiment


def simulate(cfg: RunConfig, on_round: RoundCallback | None = None) -> RunSummary:
    """Run `cfg` with the in-process engine and write its run directory."""
    from clients.app import app as client_app
    from simulations.inprocess import InProcessGrid
    from strategies import build_strategy

    strategy = build_strategy(cfg)  # fail on a bad strategy before anything is written
    run_dir = RunDir.create(Path(cfg.out) if cfg.out else default_run_path(), cfg)
    grid = InProcessGrid(client_app, cfg.simulation.clients, cfg.to_flat())
    return run_experiment(grid, cfg, run_dir, on_round=on_round, strategy=strategy)
