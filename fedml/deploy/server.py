"""`fedml server`: a Flower SuperLink plus our ServerApp run, writing a run directory.

What it does, in order (every user error surfaces before anything is started):

1. checks that HOST:PORT is free, the config (loading the server's test data and
   building model and strategy, exactly as the ServerApp will) and the PKI files;
2. starts `flower-superlink` on 127.0.0.1 and a private port, with TLS, SuperNode
   authentication, no telemetry and no runtime dependency installation (or, with
   `insecure`, none of the first two);
3. starts the front (fedml.deploy.front) on HOST:PORT, the only address sites (or
   anyone else) can reach: it forwards the Fleet API and nothing else, so the Control
   API (`flwr run`, `flwr stop`, `flwr supernode register`, ...) answers on this machine
   only;
4. registers every site key in `PKI/nodes/*.pub` and waits (bounded) until those sites
   are online;
5. writes a Flower App bundle folder holding only `pyproject.toml`: the components
   (`fedml.server:app`, `clients.app:app`) and the resolved config as the app's config.
   The bundle carries no code: the SuperLink and every site run the fedml they have
   installed (and a site refuses any other app, see fedml.deploy.site_task);
6. submits the run with `flwr run` (Flower's supported entry point) and follows it: each
   round the ServerApp commits to the run directory is passed to `on_round`;
7. stops the SuperLink and the front however it ends (Ctrl-C and SIGTERM included) and
   removes its work folder; a folder left by a SIGKILLed server is swept at the next start.

The SuperLink keeps no state of its own (in memory): resume is our run store's job.
`resume=True` makes the ServerApp continue the run directory from its newest intact
commit, as `fedml simulate --resume` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedml.config import SERVER_LOCAL_ENV, RunConfig, with_overrides
from fedml.deploy.launch import CONNECTION, RoundCallback, local_host, superlink_run
from fedml.deploy.processes import (
    Child,
    bind_error,
    flower_command,
    free_port,
    pid_alive,
    run_quietly,
    wait_for_port,
)
from fedml.errors import FedmlError
from fedml.pki import server_files
from fedml.runstore import RunStatus, refuse_existing_run, run_status
from fedml.server import Experiment

StatusCallback = Callable[[str], None]
WORK_PREFIX = "fedml-server-"  # the work folder in the temporary directory
OWNER_FILE = "owner.pid"  # in it: the pid of the fedml server that made it
PRIVATE_HOST = "127.0.0.1"  # where the SuperLink itself listens


@dataclass(frozen=True)
class ServerOptions:
    """How to run the SuperLink."""

    pki: Path | None  # folder made by `fedml certs init`; None only when insecure
    insecure: bool = False  # no TLS, no node authentication: local experiments only
    host: str = "127.0.0.1"  # address the SuperLink binds; 0.0.0.0 for remote sites
    port: int = 8000
    wait_for_sites: float = 300.0  # seconds to wait for the registered sites before round 1
    sites: int = 0  # sites to wait for without authentication (with it: every key)


def serve(
    cfg: RunConfig,
    options: ServerOptions,
    resume: bool = False,
    on_round: RoundCallback | None = None,
    on_status: StatusCallback | None = None,
) -> RunStatus:
    """Run (or, with `resume`, continue) `cfg` on a SuperLink until the run ends; return
    the run directory's status. `cfg.out` names the run directory."""
    say = on_status or (lambda text: None)
    run_dir = Path(cfg.out).resolve()
    if not resume:
        refuse_existing_run(run_dir)
    _check_port_free(options.host, options.port)
    # config, test data, model, strategy: checked before anything starts
    Experiment.prepare(cfg, reproducible=False, sites_hold_data=True)
    node_keys = _node_keys(options)
    cfg = _with_out(cfg, run_dir)
    sweep_stale_work_folders()
    local = {SERVER_LOCAL_ENV: json.dumps(cfg.server_local())}  # for the ServerApp only
    with superlink_run(WORK_PREFIX, run_dir, local) as link, _sigterm_as_interrupt():
        (link.work / OWNER_FILE).write_text(str(os.getpid()))
        private_port = free_port()
        ca = None if options.insecure or options.pki is None else options.pki / "ca.crt"
        superlink = link.start_superlink(PRIVATE_HOST, private_port, _security(options), ca)
        link.adopt(_start_front(options, private_port, link.logs, link.env))
        say(
            f"listening on {options.host}:{options.port} for sites (Fleet API only; "
            f"logs: {link.logs})"
        )
        for key in node_keys:
            run_quietly(
                [*flower_command("flwr"), "supernode", "register", str(key), CONNECTION],
                link.env,
                timeout=60,
            )
        expected = len(node_keys) if node_keys else options.sites
        _wait_for_sites(expected, options.wait_for_sites, link.env, superlink, say)
        start_round = run_status(run_dir).rounds_done if resume else 0
        say(f"run submitted; rounds are committed to {run_dir}")
        link.run(cfg, resume=resume, simulated=False, start_round=start_round, on_round=on_round)
    return link.finished_status(f"fedml server --resume {run_dir} --pki PKI_DIR")


def _check_port_free(host: str, port: int) -> None:
    """One clear error, before anything starts, when HOST:PORT is taken (by another
    fedml server, say) or cannot be bound here."""
    error = bind_error(host, port)
    if error is not None:
        raise FedmlError(
            f"Cannot listen on {host}:{port}: {error.strerror or error}. Another program "
            "(another fedml server?) may use that port: stop it or choose --port; "
            "--host must be an address of this machine (0.0.0.0 for all)."
        )


def sweep_stale_work_folders() -> list[Path]:
    """Remove work folders of fedml servers that no longer run (SIGKILLed); returns them."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(WORK_PREFIX + "*"):
        try:
            owner = int((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or still being made
        if owner != os.getpid() and not pid_alive(owner):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a service manager stopping us) ends the run like Ctrl-C: children
    stopped, work folder removed, the run left resumable."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if sys.platform == "win32":
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _node_keys(options: ServerOptions) -> list[Path]:
    if options.insecure:
        return []
    if options.pki is None:
        raise FedmlError(
            "fedml server needs --pki DIR (made by `fedml certs init`), or --insecure for a "
            "local experiment without TLS and node authentication."
        )
    keys = server_files(options.pki).node_keys
    if not keys:
        raise FedmlError(
            f"{options.pki}/nodes holds no site keys, so no site could connect. Add one per "
            "site: fedml certs add-node NAME --pki " + str(options.pki)
        )
    return keys


def _with_out(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """The config the ServerApp receives: the run directory and an `npz:` test folder
    as absolute paths on this machine (the ServerApp's working directory is Flower's)."""
    overrides = {"out": str(run_dir)}
    if cfg.data.dataset.startswith("npz:"):
        overrides["data.dataset"] = "npz:" + str(Path(cfg.data.dataset[4:]).expanduser().resolve())
    return with_overrides(cfg, overrides)


def _security(options: ServerOptions) -> list[str]:
    """The SuperLink's TLS and node-authentication options (or --insecure)."""
    if options.insecure:
        return ["--insecure"]
    pki = _pki(options)
    return [
        "--ssl-ca-certfile", str(pki / "ca.crt"),
        "--ssl-certfile", str(pki / "server.crt"),
        "--ssl-keyfile", str(pki / "server.key"),
        "--enable-supernode-auth",
    ]  # fmt: skip


def _start_front(
    options: ServerOptions, private_port: int, logs: Path, env: dict[str, str]
) -> Child:
    """The front on the public HOST:PORT, forwarding the Fleet API to the SuperLink."""
    command = [
        sys.executable, "-m", "fedml.deploy.front",
        "--host", options.host, "--port", str(options.port),
    ]  # fmt: skip
    if options.insecure:
        command += ["--backend", f"http://{PRIVATE_HOST}:{private_port}"]
    else:
        pki = _pki(options)
        command += [
            "--backend", f"https://{PRIVATE_HOST}:{private_port}",
            "--certfile", str(pki / "server.crt"),
            "--keyfile", str(pki / "server.key"),
            "--cafile", str(pki / "ca.crt"),
            "--node-keys", str(pki / "nodes"),
        ]  # fmt: skip
    front = Child("front", command, logs / "front.log", env)
    try:
        wait_for_port(local_host(options.host), options.port, front, timeout=60)
    except FedmlError:
        front.stop()
        raise
    return front


def _pki(options: ServerOptions) -> Path:
    assert options.pki is not None
    return options.pki.resolve()


def _wait_for_sites(
    expected: int, timeout: float, env: dict[str, str], superlink: Child, say: StatusCallback
) -> None:
    """Until `expected` sites are online or `timeout` passes (then the strategy's own
    minimum decides when round 1 starts)."""
    if expected <= 0:
        return
    deadline, shown = time.monotonic() + timeout, -1
    while True:
        online = _online_sites(env)
        if online != shown:
            say(f"sites online: {online} of {expected}")
            shown = online
        if online >= expected:
            return
        if time.monotonic() >= deadline:
            say(f"waited {timeout:.0f} s for the sites; starting with {online} online")
            return
        if not superlink.alive():
            raise FedmlError(f"The SuperLink exited; its log ends with:\n{superlink.tail()}")
        time.sleep(1.0)


def _online_sites(env: dict[str, str]) -> int:
    out = run_quietly(
        [*flower_command("flwr"), "supernode", "ls", CONNECTION, "--format", "json"],
        env,
        timeout=60,
    )
    try:
        nodes = json.loads(out[out.index("{") :]).get("nodes", [])
    except ValueError:
        return 0
    return sum(1 for node in nodes if node.get("status") == "online")
