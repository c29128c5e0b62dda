"""Child processes of a deployment (SuperLink, SuperNode, the `flwr` CLI): started with
Flower's telemetry, update checks and runtime installs off, logged to a file, waited
on with a bound, and stopped with their whole process group."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedml.errors import FedmlError

# What everything we start runs with: no phoning home, no installing code at run time.
QUIET_FLOWER = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def flower_env(flower_home: Path | None = None) -> dict[str, str]:
    """The environment for a Flower process: ours, Flower's chatter off, and
    `FLWR_HOME` (Flower's config and installed apps) when given. This Python's scripts
    folder goes first on `PATH`: Flower starts its own helpers (`flower-superexec`,
    `flwr-serverapp`, `flwr-simulation`) by name, and they must be this installation's
    even when its virtual environment is not activated. Flower's `FLWR_INTERNAL_*`
    switches are dropped."""
    scripts = str(Path(sys.executable).parent)
    path = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    # Flower's FLWR_INTERNAL_* switches open legacy services (an unauthenticated gRPC
    # Control API on all interfaces, for one): never inherited by what we start.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_INTERNAL_")}
    env = {**inherited, **QUIET_FLOWER, "PYTHONUNBUFFERED": "1", "PATH": path}
    if flower_home is not None:
        env["FLWR_HOME"] = str(flower_home)
    return env


def flower_command(name: str) -> list[str]:
    """The command line of a Flower console script installed next to this Python."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise FedmlError(f"Flower's `{name}` command is not installed; pip install 'flwr>=1.42'.")
    return [found]


KILL_WAIT_S = 10.0  # a SIGKILLed process is gone within this (bounded anyway)


class Child:
    """One started process with its own process group and log file."""

    def __init__(self, name: str, command: list[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = log.open("ab")
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own group: stop() reaches its children too
            preexec_fn=die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after `grace` seconds (at once
        when `grace` is 0: nothing it would do on the way out matters any more), and
        every process group its descendants had started: Flower runs its SuperExec in a
        session of its own, and Ray's workers and agents live in that one, so they would
        outlive the SuperLink otherwise."""
        groups = {self.process.pid} | self._descendant_groups()
        if self.alive() and grace > 0:
            _signal_group(self.process.pid, signal.SIGTERM)
            # While it shuts down, collect its descendants' groups again and again: what
            # is born meanwhile (a Ray worker the pool starts as the shutdown begins, in
            # a session of its own) is found only while its parent lives. The child is
            # not reaped until then, so its pid cannot be reused under us.
            deadline = time.monotonic() + grace
            while not self._exited_unreaped() and time.monotonic() < deadline:
                groups |= self._descendant_groups()
                time.sleep(0.1)
        groups |= self._watchers_groups()  # before it is reaped: its pid is still its own
        if self.alive():
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait(KILL_WAIT_S)
        for group in groups:  # what outlived it, or was born while it died: all at
            _signal_group(group, signal.SIGKILL)  # once, so they die side by side
        for group in sorted(groups):
            sweep_group(group)
        self._log_handle.close()

    def _exited_unreaped(self) -> bool:
        """Whether the child has exited, leaving it unreaped (a zombie keeps its pid)."""
        if self.process.returncode is not None:
            return True
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def _watchers_groups(self) -> set[int]:
        """The process groups of Flower's processes that watch this one (started with
        `--parent-pid PID`, e.g. `flwr-simulation`) and of their descendants: once this
        process died they are orphans, no longer its descendants, and would shut down
        (Ray and all) only in their own time."""
        table = _process_table()
        marker = f"--parent-pid\0{self.pid}\0".encode()
        watchers = set()
        for pid in table:
            try:
                if marker in Path(f"/proc/{pid}/cmdline").read_bytes() + b"\0":
                    watchers |= {pid} | descendants(pid, table)
            except OSError:
                continue  # it ended while we looked
        groups = {table[pid][1] for pid in watchers if pid in table}
        groups.discard(os.getpgrp())
        return groups

    def _descendant_groups(self) -> set[int]:
        """The process groups of this process's live descendants (never our own)."""
        table = _process_table()
        groups = {table[d][1] for d in descendants(self.pid, table)}
        groups.discard(os.getpgrp())
        return groups

    def tail(self, lines: int = 15) -> str:
        """The end of the log, for an error message."""
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def die_with_parent() -> None:
    """In the child, before exec: on Linux, be SIGKILLed when the process that started
    us dies, even by SIGKILL (no orphaned SuperLink holding the port and the run). Flower's
    own children (ServerApp, ClientApp processes) watch their parent themselves."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1  # the name in <sys/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def sweep_group(pgid: int, timeout: float = 5.0) -> None:
    """SIGKILL process group `pgid` until no live process is left in it (bounded). One
    signal is not always enough: a dying Ray head may still be starting its agents."""
    deadline = time.monotonic() + timeout
    while True:
        _signal_group(pgid, signal.SIGKILL)
        if not group_members(pgid) or time.monotonic() >= deadline:
            return
        time.sleep(0.1)


def group_members(pgid: int) -> list[int]:
    """The live processes of process group `pgid`."""
    return [pid for pid, (_, group, _) in _process_table().items() if group == pgid]


def descendants(pid: int, table: dict[int, tuple[int, int, str]]) -> set[int]:
    """The children of `pid` in `table` (`_process_table()`), theirs, and so on."""
    children: dict[int, list[int]] = {}
    for child, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state) of every live (not zombie) process,
    from Linux's /proc; elsewhere empty, so the sweeps above do nothing more."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        if state != "Z":
            table[int(stat.parent.name)] = (int(parent), int(group), state)
    return table


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def run_quietly(command: list[str], env: dict[str, str], timeout: float) -> str:
    """Run a short Flower CLI command; its output, or a FedmlError with it."""
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise FedmlError(f"`{' '.join(command[:3])}` did not answer in {timeout:.0f} s.") from exc
    if done.returncode != 0:
        raise FedmlError(
            f"`{' '.join(command[:3])}` failed (exit {done.returncode}): "
            f"{(done.stdout + done.stderr).strip()[-800:]}"
        )
    return done.stdout


def wait_for_port(host: str, port: int, child: Child, timeout: float) -> None:
    """Until `host:port` accepts connections; a clear error when `child` dies first or
    the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise FedmlError(
                f"The {child.name} exited (code {child.process.returncode}) before listening "
                f"on {host}:{port}. Its log ({child.log}) ends with:\n{child.tail()}"
            )
        if port_open(host, port):
            return
        time.sleep(0.2)
    raise FedmlError(f"The {child.name} did not listen on {host}:{port} within {timeout:.0f} s.")


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connection to `host:port` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def bind_error(host: str, port: int) -> OSError | None:
    """Why this machine cannot listen on `host:port` right now (in use by another
    program, or not an address of this machine), or None when it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc
    return None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (someone else's process counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:port`) as a pair, or a clear error."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise FedmlError(f"{address!r} is not HOST:PORT (e.g. superlink.example.org:8000).")
    return host.strip("[]"), int(port)
