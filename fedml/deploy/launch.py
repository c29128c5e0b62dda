"""Submitting a fedml run to a Flower SuperLink and following it: what `fedml server`
(a SuperLink for real sites) and the Ray engine (a SuperLink with Flower's Simulation
Runtime) share.

The run goes through `flwr run` (Flower's supported entry point) on a generated Flower
App folder that holds only `pyproject.toml`: our components and the resolved config. No
code travels with it: the SuperLink, the Simulation Runtime and every site run the fedml
they have installed. The ServerApp writes the usual run directory; `follow_rounds`
reports each round it commits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedml.config import RESUME_KEY, SIMULATED_KEY, RunConfig
from fedml.deploy.processes import Child, flower_command, wait_for_port
from fedml.errors import FedmlError
from fedml.runstore import (
    CONFIG,
    RunStatus,
    commit_round,
    list_commit_dirs,
    read_history,
    run_status,
)

CONNECTION = "fedml"  # the SuperLink connection's name in the generated Flower config
APP_NAME = "fedml-app"
LOGS = "logs"  # RUN_DIR/logs: the SuperLink's and `flwr run`'s logs

RoundCallback = Callable[[dict[str, Any]], None]


def write_app(folder: Path, cfg: RunConfig, resume: bool, simulated: bool = False) -> Path:
    """A Flower App folder: `pyproject.toml` naming our components, with the resolved
    config as the app's config (plus the resume and simulation flags). No code travels
    with it."""
    import tomli_w

    config: dict[str, Any] = {k: v for k, v in cfg.to_flat().items() if v is not None}
    config[RESUME_KEY] = resume
    if simulated:
        config[SIMULATED_KEY] = True
    project = {
        "project": {
            "name": APP_NAME,
            "version": "1.0.0",
            "description": "fedml run (config only; the code is the installed fedml)",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedml",
                    "components": {
                        "serverapp": "fedml.server:app",
                        "clientapp": "clients.app:app",
                    },
                    "config": config,
                }
            }
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project), encoding="utf-8")
    return folder


def write_flower_config(home: Path, address: str, root_certificates: Path | None) -> None:
    """Flower's CLI config (`FLWR_HOME/config.toml`) with one SuperLink connection:
    TLS verified against `root_certificates`, or insecure when None."""
    import tomli_w

    connection: dict[str, Any] = {"address": address}
    if root_certificates is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(root_certificates.resolve())
    home.mkdir(parents=True, exist_ok=True)
    text = tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}})
    (home / "config.toml").write_text(text, encoding="utf-8")


def start_superlink(
    host: str, port: int, log: Path, env: dict[str, str], options: list[str]
) -> Child:
    """`flower-superlink` bound to `host:port` with `options` (TLS or `--insecure`,
    `--simulation`, ...) and never installing dependencies at run time; returned once it
    listens (reached at `local_host(host)`), stopped and an error if it does not."""
    command = [
        *flower_command("flower-superlink"),
        "--host", host,
        "--port", str(port),
        "--disable-runtime-dependency-installation",
        *options,
    ]  # fmt: skip
    superlink = Child("SuperLink", command, log, env)
    try:
        wait_for_port(local_host(host), port, superlink, timeout=60)
    except FedmlError:
        superlink.stop()
        raise
    return superlink


def local_host(host: str) -> str:
    """Where this machine reaches a SuperLink bound to `host` (its certificate names
    localhost and 127.0.0.1 as well, see fedml.pki)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def submit(
    app_dir: Path, logs: Path, env: dict[str, str], federation_config: str | None = None
) -> Child:
    """`flwr run APP fedml --stream`: the run's ServerApp log goes to `logs/run.log`."""
    command = [*flower_command("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
    if federation_config:
        command += ["--federation-config", federation_config]
    return Child("flwr run", command, logs / "run.log", env)


def follow_rounds(
    run_dir: Path,
    flwr_run: Child,
    superlink: Child,
    start_round: int,
    on_round: RoundCallback | None,
) -> None:
    """Pass each newly committed history row to `on_round` until `flwr run` ends."""
    shown = start_round
    while True:
        finished = not flwr_run.alive()
        committed = _newest_commit(run_dir)
        for row in read_history(run_dir):
            if shown < row["round"] <= committed:
                shown = row["round"]
                if on_round is not None:
                    on_round(row)
        if finished:
            return
        if not superlink.alive():
            raise FedmlError(f"The SuperLink exited; its log ends with:\n{superlink.tail()}")
        time.sleep(0.5)


def finished_status(run_dir: Path, flwr_run: Child, resume_command: str) -> RunStatus:
    """The run directory's status once `flwr run` has ended; a clear error when the run
    never started (quoting `flwr run`'s log) or stopped before it finished (naming
    `resume_command`, which continues it)."""
    if not (run_dir / CONFIG).exists():
        raise FedmlError(
            f"The run did not start. `flwr run` ({flwr_run.log}) ends with:\n{flwr_run.tail()}"
        )
    status = run_status(run_dir)
    if status.stop_reason is None:
        raise FedmlError(
            f"The run stopped before it finished ({status.rounds_done} round(s) committed). "
            f"The ServerApp's log is {flwr_run.log}; continue with `{resume_command}`."
        )
    return status


def _newest_commit(run_dir: Path) -> int:
    commits = list_commit_dirs(run_dir)
    return (commit_round(commits[-1]) or 0) if commits else 0
