"""The Ray engine: the same ServerApp and ClientApp on Flower's Simulation Runtime.

`fedml simulate --engine ray` goes through Flower's supported entry point: it starts a
local `flower-superlink --simulation` (loopback only, a free port, no telemetry, no
runtime dependency installation) and submits the run with `flwr run`, whose federation
config sets the virtual SuperNodes (`simulation.clients`) and each ClientApp's Ray
resources (`simulation.num_cpus`, `simulation.num_gpus`; a GPU fraction lets several
clients share one device). With `simulation.ray_address` the Runtime joins that Ray
cluster (Ray reads `RAY_ADDRESS`) instead of starting Ray on this machine.

The ServerApp writes the usual run directory (its logs under `RUN_DIR/logs`), and numbers
the simulated nodes like the in-process engine (simulations/virtual_nodes.py), so the
same seed plays the same rounds on both engines, and a run may be resumed on either.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from fedml.config import RunConfig, with_overrides
from fedml.deploy.launch import RoundCallback, superlink_run
from fedml.deploy.processes import free_port
from fedml.errors import FedmlError
from fedml.runstore import default_run_path, refuse_existing_run, run_status
from fedml.server import Experiment, RunSummary

HOST = "127.0.0.1"


def simulate_on_ray(
    cfg: RunConfig, on_round: RoundCallback | None = None, resume: bool = False
) -> RunSummary:
    """Run `cfg` on Flower's Simulation Runtime until it ends, or continue its run
    directory `cfg.out` (checked by `open_resume`) with `resume`."""
    require_ray()
    Experiment.prepare(cfg)  # config, data, model, strategy: errors before anything starts
    run_dir = Path(cfg.out or default_run_path()).resolve()
    if not resume:
        refuse_existing_run(run_dir)
    cfg = with_overrides(cfg, {"out": str(run_dir)})
    started = time.perf_counter()
    start_round = run_status(run_dir).rounds_done if resume else 0
    with superlink_run("fedml-ray-", run_dir, ray_env(cfg)) as link:
        link.start_superlink(HOST, free_port(), ["--simulation", "--insecure"], None)
        link.run(
            cfg,
            resume=resume,
            simulated=True,
            start_round=start_round,
            on_round=on_round,
            federation_config=federation_config(cfg),
        )
    status = link.finished_status(f"fedml simulate --resume {run_dir}")
    seconds = time.perf_counter() - started
    return RunSummary.from_status(status, seconds, start_round if resume else None)


def ray_env(cfg: RunConfig) -> dict[str, str]:
    """What the SuperLink's environment (which the Simulation Runtime inherits) adds to
    Flower's: Ray's usage statistics off (Ray would otherwise report them), and
    `RAY_ADDRESS` when the run joins a Ray cluster (Ray reads it)."""
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    if cfg.simulation.ray_address:
        env["RAY_ADDRESS"] = cfg.simulation.ray_address
    return env


def federation_config(cfg: RunConfig) -> str:
    """`flwr run --federation-config`: the virtual SuperNodes and each one's resources."""
    sim = cfg.simulation
    return (
        f"num-supernodes={sim.clients} client-resources-num-cpus={sim.num_cpus} "
        f"client-resources-num-gpus={float(sim.num_gpus)}"
    )


def require_ray() -> None:
    """A clear error when Flower's simulation extra (Ray) is not installed."""
    if importlib.util.find_spec("ray") is None:
        raise FedmlError(
            "--engine ray needs Ray, which Flower's Simulation Runtime runs on: "
            "pip install 'fedml-sites[ray]' (or 'flwr[simulation]'). The default "
            "in-process engine needs nothing more."
        )
