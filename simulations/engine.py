"""Run a config on the chosen engine: the functions `fedml simulate` calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clients.app import app as client_app
from fedml.config import RunConfig, resume_config
from fedml.errors import FedmlError
from fedml.runstore import RunStore, default_run_path
from fedml.server import Experiment, RoundCallback, RunSummary, run_experiment
from simulations.inprocess import InProcessGrid
from simulations.ray_engine import simulate_on_ray


def open_resume(
    path: Path, overrides: dict[str, Any], deployed: bool = False
) -> tuple[RunStore, RunConfig]:
    """The run directory at `path` and the config to continue it with: the stored
    config plus the resumable overrides (any other change is refused). `deployed`: the
    caller is `fedml server`; a run continues only the way it started (real sites or
    simulated clients), never silently as the other."""
    store = RunStore.open(path)
    if store.deployed and not deployed:
        raise FedmlError(
            f"{path} was started by `fedml server` with real sites; resuming it as a "
            f"simulation would train on other data. Continue it with `fedml server --resume "
            f"{path} --pki PKI_DIR`."
        )
    if deployed and not store.deployed:
        raise FedmlError(
            f"{path} is a simulation (fedml simulate); continue it with `fedml simulate "
            f"--resume {path}`, or start a new deployed run with `fedml server --out DIR`."
        )
    return store, resume_config(store.cfg, overrides)


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
    checkpoint = None
    if resume is None:
        store = RunStore.create(Path(cfg.out) if cfg.out else default_run_path(), cfg)
    else:
        store = resume
        checkpoint, _ = store.resume(cfg)
    grid = InProcessGrid(client_app, cfg.simulation.clients, store.cfg.to_flat())
    return run_experiment(grid, experiment, store, on_round=on_round, checkpoint=checkpoint)
