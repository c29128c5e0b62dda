"""Deployment on loopback: real `fedml server` and `fedml client` processes, a Flower
SuperLink with TLS and SuperNode authentication, each site with its own shard file.

Every process is started in its own session and killed by process group when the test
ends, pass or fail; every wait is bounded; ports are picked free on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedml.config import load_config
from fedml.data import federation_for
from fedml.deploy.processes import free_port, port_open
from fedml.pki import add_node, init_pki
from fedml.runstore import is_locked

pytestmark = pytest.mark.slow

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


class Fleet:
    """The processes one test starts, each logged to a file, all killed at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "fedml.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=ENV,
            start_new_session=True,
        )
        self.started[name] = process
        return process

    def kill(self, name: str) -> None:
        """SIGKILL a process and everything in its group (a machine going down)."""
        process = self.started[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {n}:\n{self.log(n)[-3000:]}" for n in self.started)

    def close(self) -> None:
        for name in self.started:
            self.kill(name)


@pytest.fixture
def fleet(tmp_path):
    started = Fleet(tmp_path)
    try:
        yield started
    finally:
        started.close()


def _wait(predicate: Callable[[], bool], timeout: float, what: str, fleet: Fleet) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{fleet.logs()}")


def _committed(run: Path, server_round: int) -> bool:
    return (run / "commits" / f"round-{server_round:06d}").is_dir()


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def _shards(root: Path, count: int) -> list[Path]:
    """Each site's private shard: client i of the digits federation, as an .npz file."""
    federation = federation_for(load_config(None, {"simulation.clients": count}))
    paths = []
    for i in range(count):
        shard = federation.client(i)
        path = root / f"site-{i}.npz"
        np.savez(path, x=shard.x, y=shard.y)
        paths.append(path)
    return paths


def _pki(root: Path, sites: list[str]) -> Path:
    pki = root / "pki"
    init_pki(pki)
    for name in sites:
        add_node(pki, name)
    return pki


def _client(fleet: Fleet, name: str, superlink: str, data: Path, pki: Path, *extra: str):
    return fleet.start(
        f"client-{name}",
        "client",
        "--superlink", superlink,
        "--data", str(data),
        "--pki", str(pki / "sites" / name),
        "--state-dir", str(fleet.root / f"state-{name}"),
        "--port", str(free_port()),
        *extra,
    )  # fmt: skip


def _server(fleet: Fleet, name: str, pki: Path, port: int, *args: str):
    return fleet.start(
        name,
        "server",
        "--pki", str(pki),
        "--port", str(port),
        "--wait-for-sites", "180",
        "--no-report",
        *args,
    )  # fmt: skip


def _attack_from_outside(root: Path, port: int, pki: Path, rogue_key: Path, run_id: str):
    """What an outsider holding only ca.crt tries with the stock `flwr` CLI against the
    public port: each command's exit code and output."""
    home = root / "attacker-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "target"\n[superlink.target]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{pki / "ca.crt"}"\n'
    )
    app = root / "evil-app"
    app.mkdir()
    (app / "evil.py").write_text(
        f"open({str(root / 'evil-ran')!r}, 'w').write('ran')\n"
        "from flwr.clientapp import ClientApp\nfrom flwr.serverapp import ServerApp\n"
        "server = ServerApp()\nclient = ClientApp()\n"
    )
    (app / "pyproject.toml").write_text(
        '[project]\nname = "evil"\nversion = "1.0.0"\ndescription = ""\nlicense = "MIT"\n'
        'dependencies = []\n[tool.flwr.app]\npublisher = "mallory"\n'
        '[tool.flwr.app.components]\nserverapp = "evil:server"\nclientapp = "evil:client"\n'
    )
    env = {**ENV, "FLWR_HOME": str(home)}
    flwr = str(Path(sys.executable).with_name("flwr"))
    attempts = {
        "ls": [flwr, "ls", "target"],
        "supernode ls": [flwr, "supernode", "ls", "target"],
        "supernode register": [flwr, "supernode", "register", str(rogue_key), "target"],
        "run": [flwr, "run", str(app), "target"],
        "stop": [flwr, "stop", run_id, "target"],
    }
    results = {}
    for name, command in attempts.items():
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=120, check=False
        )
        results[name] = (done.returncode, done.stdout + done.stderr)
    import httpx  # the Runtime API, which only the ServerApp should ever reach

    reply = httpx.post(
        f"https://127.0.0.1:{port}/v1/runtime/acquire-task", verify=str(pki / "ca.crt")
    )
    results["runtime api"] = (reply.status_code, reply.text)
    return results


def test_three_sites_with_tls_and_node_auth_train_outsiders_are_refused_and_a_dead_site_does_not_stop_the_run(  # noqa: E501
    tmp_path, fleet
):
    pki = _pki(tmp_path, ["a", "b", "c", "intruder"])
    rogue_key = tmp_path / "rogue.pub"
    (pki / "nodes" / "intruder.pub").rename(rogue_key)  # a key the server does not know
    data = _shards(tmp_path, 3)
    port, run = free_port(), tmp_path / "run"
    server = _server(
        fleet, "server", pki, port, "--rounds", "3", "--min-replies", "2", "--out", str(run)
    )  # fmt: skip
    superlink = f"127.0.0.1:{port}"
    for name, shard in zip("abc", data, strict=True):
        _client(fleet, name, superlink, shard, pki)
    # The intruder's 10 s of patience start once the SuperLink listens (the server's own
    # start-up, slow on a loaded machine, is not what this checks).
    _wait(lambda: port_open("127.0.0.1", port), 180, "the SuperLink's port", fleet)
    intruder = _client(fleet, "intruder", superlink, data[0], pki, "--join-timeout", "10")
    assert intruder.wait(180) == 2, fleet.log("client-intruder")
    assert "refused this site's key" in fleet.log("client-intruder")

    _wait(lambda: _committed(run, 1), 300, "round 1", fleet)
    run_id = (run / "logs" / "run.log").read_text().split("Successfully started run ")[1].split()[0]
    attempts = _attack_from_outside(tmp_path, port, pki, rogue_key, run_id)
    assert attempts.pop("runtime api")[0] == 403
    for name, (code, output) in attempts.items():
        assert code != 0 and "403 Forbidden" in output, (name, code, output)
    assert not (tmp_path / "evil-ran").exists()  # no code of theirs ran anywhere
    refused = (run / "logs" / "front.log").read_text()
    for path in ["control/list-runs", "control/list-nodes", "control/start-run", "runtime/"]:
        assert f"refused POST '/v1/{path}" in refused

    killed_at = time.monotonic()
    fleet.kill("client-c")  # a site goes down mid-run (no --round-timeout given)
    assert server.wait(600) == 0, fleet.logs()
    # Flower marks the dead site offline about a minute after its last heartbeat; its
    # message is then a failed reply, and no round waits for it to come back
    assert time.monotonic() - killed_at < 240, fleet.logs()

    rows = _rows(run)
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert rows[0]["clients"]["replied"] == 3
    assert all(row["clients"]["sampled"] <= 3 for row in rows)  # the real sites only
    # after the kill the dead site is a failed or timed-out reply, or no longer sampled
    # once the SuperLink has noticed it is offline; every message is accounted for ...
    for row in rows[1:]:
        counts = row["clients"]
        assert counts["sampled"] == counts["replied"] + counts["failed"] + counts["timed_out"]
    assert rows[-1]["clients"]["replied"] == rows[-1]["clients"]["aggregated"] == 2
    assert rows[-1]["stop"] == "max rounds"  # ... and the run went on to its last round
    assert rows[-1]["server"]["accuracy"] > 0.5  # it learned from the sites' data
    assert (run / "model.safetensors").is_file()
    assert "round 3" in fleet.log("server") and "fedml run summary" in fleet.log("server")
    # authentication was on (the intruder was refused); TLS too: each site verified
    # the SuperLink's certificate against its ca.crt before joining, and nothing ran
    # with --insecure
    assert all("--insecure" not in fleet.log(n) for n in fleet.started)


def test_a_killed_server_resumes_from_its_last_commit_and_finishes(tmp_path, fleet):
    pki = _pki(tmp_path, ["a", "b"])
    data = _shards(tmp_path, 2)
    port, run = free_port(), tmp_path / "run"
    _server(fleet, "server", pki, port, "--rounds", "4", "--out", str(run))
    for name, shard in zip("ab", data, strict=True):
        _client(fleet, name, f"127.0.0.1:{port}", shard, pki)
    _wait(lambda: _committed(run, 2), 400, "round 2", fleet)
    fleet.kill("server")  # the server machine goes down
    _wait(lambda: not is_locked(run), 60, "the ServerApp to let go of the run", fleet)
    done = _rows(run)[-1]["round"]
    assert done in (2, 3)

    resumed = _server(fleet, "resumed", pki, port, "--resume", str(run))
    assert resumed.wait(600) == 0, fleet.logs()
    rows = _rows(run)
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    assert rows[-1]["stop"] == "max rounds"
    assert rows[-1]["server"]["accuracy"] > rows[0]["server"]["accuracy"]


def test_a_run_that_never_starts_is_a_clear_error_with_flowers_words(tmp_path, monkeypatch):
    """`flwr run` submits an app whose ServerApp cannot be loaded: no run directory is
    ever written, and the error quotes the run's log instead of blaming the folder."""
    from fedml.deploy import launch
    from fedml.deploy import server as deploy_server
    from fedml.errors import FedmlError

    real_write_app = launch.write_app

    def broken_app(folder, cfg, resume, simulated=False):
        folder = real_write_app(folder, cfg, resume, simulated)
        text = (folder / "pyproject.toml").read_text()
        (folder / "pyproject.toml").write_text(text.replace("fedml.server:app", "nowhere:app"))
        return folder

    monkeypatch.setattr(launch, "write_app", broken_app)
    cfg = load_config(None, {"rounds": 1, "out": str(tmp_path / "run")})
    options = deploy_server.ServerOptions(None, insecure=True, port=free_port())
    with pytest.raises(FedmlError, match="The run did not start") as error:
        deploy_server.serve(cfg, options)
    assert "run.log" in str(error.value)
    assert not (tmp_path / "run" / "config.toml").exists()


def test_secure_aggregation_over_real_supernodes_with_tls(tmp_path, fleet):
    """Three sites behind TLS and node auth play secure rounds: each site's keys and
    secrets live in its SuperNode's context between the four exchanges, and the server
    unmasks only the sum."""
    pki = _pki(tmp_path, ["a", "b", "c"])
    data = _shards(tmp_path, 3)
    port, run = free_port(), tmp_path / "run"
    server = _server(
        fleet, "server", pki, port, "--rounds", "2", "--secagg", "--out", str(run)
    )  # fmt: skip
    for name, shard in zip("abc", data, strict=True):
        _client(fleet, name, f"127.0.0.1:{port}", shard, pki)
    assert server.wait(600) == 0, fleet.logs()
    rows = _rows(run)
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        secagg = row["secagg"]
        assert (secagg["shared"], secagg["unmasked"], secagg["dropped"]) == (3, 3, 0)
        assert row["clients"]["aggregated"] == 3
    assert rows[-1]["server"]["accuracy"] > rows[0]["server"]["accuracy"]
    # the summed example count is the sites' training splits (20% of each is validation)
    total = sum(len(np.load(p)["y"]) for p in data)
    assert rows[-1]["train"]["num-examples"] == pytest.approx(0.8 * total, abs=3)
