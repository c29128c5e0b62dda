"""Run a config on the chosen engine: the functions `fedml simulate` calls."""

from __future__ import annotations

from clients.app import app as client_app
from fedml.config import RunConfig
from fedml.runstore import RunStore, open_run
from fedml.server import Experiment, RoundCallback, RunSummary, run_experiment
from simulations.inprocess import InProcessGrid
from simulations.ray_engine import simulate_on_ray


def simulate(
    cfg: RunConfig, on_round: RoundCallback | None = None, resume: RunStore | None = None
) -> RunSummary:
    """Run `cfg` on its engine (`simulation.engine`): a new run directory, or continue
    `resume` (opened with `open_resume`) from its newest intact commit."""
    if cfg.simulation.engine == "ray":
        if resume is not None:  # the in-process engine's checks (lock, damage, config),
            resume.resume(cfg)  # then the ServerApp, in the Simulation Runtime, takes over
            resume.close()
        return simulate_on_ray(cfg, on_round, resume=resume is not None)
    return simulate_in_process(cfg, on_round, resume)


def simulate_in_process(
    cfg: RunConfig, on_round: RoundCallback | None = None, resume: RunStore | None = None
) -> RunSummary:
    """Run `cfg` with the in-process engine (see `simulate`)."""
    experiment = Experiment.prepare(cfg)  # user errors surface before anything is written
    store, checkpoint = open_run(cfg, resume, deployed=False)
    grid = InProcessGrid(client_app, cfg.simulation.clients, store.cfg.to_flat())
    return run_experiment(grid, experiment, store, on_round=on_round, checkpoint=checkpoint)
