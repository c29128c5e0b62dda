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

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedml.config import RESUME_KEY, SERVER_LOCAL, SIMULATED_KEY, RunConfig
from fedml.deploy.processes import Child, flower_command, flower_env, wait_for_port
from fedml.errors import FedmlError
from fedml.runstore import (
    CONFIG,
    RunStatus,
    commit_round,
    is_locked,
    list_commit_dirs,
    newest_stop_reason,
    read_history,
    run_status,
)
from fedml.server import RoundCallback

CONNECTION = "fedml"  # the SuperLink connection's name in the generated Flower config
APP_NAME = "fedml-app"
LOGS = "logs"  # RUN_DIR/logs: the SuperLink's and `flwr run`'s logs
FOLLOW_POLL_S = 0.2  # how often the run directory is looked at while a run goes on


@dataclass
class SuperLinkRun:
    """One fedml run on a SuperLink that this process starts: the lifecycle `fedml
    server` and the Ray engine share. Made by `superlink_run`, which stops every child
    (newest first) and removes the work folder (Flower home, app folder) at the end,
    whatever happens:

        with superlink_run("fedml-ray-", run_dir) as link:
            link.start_superlink(host, port, options, root_certificates=None)
            link.run(cfg, resume=False, simulated=True, start_round=0, on_round=None)
        status = link.finished_status("fedml simulate --resume RUN_DIR")
    """

    run_dir: Path
    work: Path
    env: dict[str, str]
    children: list[Child] = field(default_factory=list)
    superlink: Child | None = None
    flwr_run: Child | None = None
    over: bool = False  # the run directory says the run finished: stop the rest at once

    @property
    def logs(self) -> Path:
        return self.run_dir / LOGS

    def start_superlink(
        self, host: str, port: int, options: list[str], root_certificates: Path | None
    ) -> Child:
        """The SuperLink on `host:port`, and the Flower config that reaches it (TLS
        verified against `root_certificates`, or insecure when None)."""
        address = f"{local_host(host)}:{port}"
        write_flower_config(self.work / "flwr-home", address, root_certificates)
        self.superlink = self.adopt(
            start_superlink(host, port, self.logs / "superlink.log", self.env, options)
        )
        return self.superlink

    def adopt(self, child: Child) -> Child:
        """Stop `child` with the others at the end of the run."""
        self.children.append(child)
        return child

    def run(
        self,
        cfg: RunConfig,
        *,
        resume: bool,
        simulated: bool,
        start_round: int,
        on_round: RoundCallback | None,
        federation_config: str | None = None,
    ) -> None:
        """Submit the run with `flwr run` and report its rounds until it ends."""
        assert self.superlink is not None, "start_superlink first"
        app_dir = write_app(self.work / "app", cfg, resume, simulated)
        self.flwr_run = self.adopt(submit(app_dir, self.logs, self.env, federation_config))
        self.over = follow_rounds(
            self.run_dir, self.flwr_run, self.superlink, start_round, on_round
        )

    def finished_status(self, resume_command: str) -> RunStatus:
        """The run directory's status once the run has ended (see `finished_status`)."""
        assert self.flwr_run is not None, "run first"
        return finished_status(self.run_dir, self.flwr_run, resume_command)


@contextlib.contextmanager
def superlink_run(
    work_prefix: str, run_dir: Path, extra_env: dict[str, str] | None = None
) -> Iterator[SuperLinkRun]:
    """A `SuperLinkRun` with a fresh work folder in the temporary directory (named
    `work_prefix`...) and Flower's environment (`flower_env`, plus `extra_env`). Once the
    run directory says the run is over, the children are killed without a grace period:
    their shutdown (Ray's, the log stream's) would only keep the caller waiting."""
    work = Path(tempfile.mkdtemp(prefix=work_prefix))
    link = SuperLinkRun(run_dir, work, env={})
    try:
        link.env = {**flower_env(work / "flwr-home"), **(extra_env or {})}
        yield link
    finally:
        for child in reversed(link.children):
            child.stop(grace=0.0 if link.over else 10.0)
        shutil.rmtree(work, ignore_errors=True)


def write_app(folder: Path, cfg: RunConfig, resume: bool, simulated: bool = False) -> Path:
    """A Flower App folder: `pyproject.toml` naming our components, with the resolved
    config as the app's config (plus the resume and simulation flags). No code travels
    with it."""
    config: dict[str, Any] = {k: v for k, v in cfg.to_flat().items() if v is not None}
    config[RESUME_KEY] = resume
    if simulated:
        config[SIMULATED_KEY] = True
    else:  # deployed: the server's paths stay on the server (SERVER_LOCAL_ENV)
        config.update(SERVER_LOCAL)
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
) -> bool:
    """Pass each newly committed history row to `on_round` until the run is over; True
    when it ended by the run directory's word, before `flwr run` did.

    The run is over when `flwr run` ends, or as soon as the run directory says so: its
    ServerApp took the directory's lock during this follow and has let go of it (every
    write is done), and a round committed during this follow holds a stop reason (a
    resumed run's older stop reason does not count). What Flower does after that
    (shutting down Ray, streaming the last log lines) takes seconds and changes nothing
    in the run, so the caller may stop it (`SuperLinkRun.run`)."""
    shown = start_round
    held = False  # the ServerApp held the run directory's lock during this follow
    while True:
        ended = not flwr_run.alive()
        locked = is_locked(run_dir)
        released, held = held and not locked, held or locked
        committed = _newest_commit(run_dir)
        if committed > shown:
            for row in read_history(run_dir):
                if shown < row["round"] <= committed:
                    shown = row["round"]
                    if on_round is not None:
                        on_round(row)
        if ended:
            return False
        if released and committed > start_round and newest_stop_reason(run_dir):
            return True
        if not superlink.alive():
            raise FedmlError(f"The SuperLink exited; its log ends with:\n{superlink.tail()}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            flwr_run.wait(FOLLOW_POLL_S)  # returns at once when `flwr run` ends


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
