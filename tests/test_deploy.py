"""Deployment on loopback: real `fedml server` and `fedml client` processes, a Flower
SuperLink with TLS and SuperNode authentication, each site with its own shard file.

Every process is started in its own session and killed by process group when the test
ends, pass or fail; every wait is bounded; ports are picked free on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedml import audit
from fedml.config import load_config
from fedml.data import load_federation
from fedml.data.export import write_split
from fedml.deploy.processes import free_port, port_open
from fedml.pki import add_node, init_pki
from fedml.runstore import is_locked

pytestmark = pytest.mark.slow

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


class Fleet:
    """The processes one test starts, each logged to a file, all killed at the end.

    Each process runs as a separate machine would: in its own folder (its working
    directory and its HOME), given relative paths only. The server's folder holds its
    PKI and `shards/test.npz`; a site's folder holds its own data file and its
    `sites/NAME` PKI folder, and nothing of the server's."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: dict[str, subprocess.Popen] = {}

    def machine(self, name: str) -> Path:
        """The folder that stands for machine `name` (made on first use)."""
        folder = self.root / name
        folder.mkdir(exist_ok=True)
        return folder

    def start(self, name: str, machine: str, *args: str) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("wb")
        home = self.machine(machine)
        process = subprocess.Popen(
            [sys.executable, "-m", "fedml.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**ENV, "HOME": str(home)},
            cwd=home,
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


SERVER = "server"  # the server machine's folder


def _split(fleet: Fleet, sites: str, dataset: str = "digits") -> dict[str, str]:
    """The `dataset` federation split for `sites` (one letter each), as `fedml data
    split` writes it: the server's folder gets only `shards/test.npz`, site X's folder
    only its own `client-<i>.npz`. Returns each site's data file name (relative to its
    folder)."""
    scratch = fleet.root / "split"
    federation = load_federation(dataset, "auto", len(sites), 0.2, 0)
    write_split(federation, scratch)
    shards = fleet.machine(SERVER) / "shards"
    shards.mkdir()
    shutil.move(scratch / "test.npz", shards / "test.npz")
    names = {}
    for i, site in enumerate(sites):
        names[site] = f"client-{i}.npz"
        shutil.move(scratch / names[site], fleet.machine(f"site-{site}") / names[site])
    shutil.rmtree(scratch)
    return names


def _pki(fleet: Fleet, sites: str) -> Path:
    """The server's PKI (in its folder), and each site's `sites/NAME` folder copied to
    that site's machine, as README says to."""
    pki = fleet.machine(SERVER) / "pki"
    init_pki(pki)
    for site in sites:
        add_node(pki, site)
        shutil.copytree(pki / "sites" / site, fleet.machine(f"site-{site}") / site)
    return pki


def _client(fleet: Fleet, site: str, superlink: str, data: str, *extra: str, machine: str = ""):
    """Site `site` from its own folder: relative --data and --pki, the default state folder."""
    return fleet.start(
        f"client-{site}",
        machine or f"site-{site}",
        "client",
        "--superlink", superlink,
        "--data", data,
        "--pki", site,
        "--port", str(free_port()),
        *extra,
    )  # fmt: skip


def _server(fleet: Fleet, name: str, port: int, *args: str):
    return fleet.start(
        name,
        SERVER,
        "server",
        "--pki", "pki",
        "--port", str(port),
        "--wait-for-sites", "180",
        "--no-report",
        *args,
    )  # fmt: skip


def _train_examples(files: list[Path]) -> int:
    """How many examples sites holding `files` train on each round (each file less its
    validation split, as `clients.app` takes it)."""
    total = 0
    for path in files:
        n = len(np.load(path)["y"])
        total += n - min(n - 1, max(1, round(n * 0.2)))
    return total


def _site_files(fleet: Fleet, data: dict[str, str]) -> list[Path]:
    return [fleet.machine(f"site-{site}") / name for site, name in data.items()]


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
    data = _split(fleet, "abc")
    pki = _pki(fleet, "abc")
    add_node(pki, "intruder")
    intruder_home = fleet.machine("site-intruder")
    shutil.copytree(pki / "sites" / "intruder", intruder_home / "intruder")
    shutil.copy(fleet.machine("site-a") / data["a"], intruder_home / data["a"])
    rogue_key = tmp_path / "rogue.pub"
    (pki / "nodes" / "intruder.pub").rename(rogue_key)  # a key the server does not know
    port, run = free_port(), fleet.machine(SERVER) / "run"
    server = _server(
        fleet, "server", port, "--dataset", "npz:shards", "--rounds", "3", "--min-replies", "2",
        "--out", "run",
    )  # fmt: skip
    superlink = f"127.0.0.1:{port}"
    for site in "abc":
        _client(fleet, site, superlink, data[site])
    # The intruder's 10 s of patience start once the SuperLink listens (the server's own
    # start-up, slow on a loaded machine, is not what this checks).
    _wait(lambda: port_open("127.0.0.1", port), 180, "the SuperLink's port", fleet)
    intruder = _client(fleet, "intruder", superlink, data["a"], "--join-timeout", "10")
    assert intruder.wait(180) == 2, fleet.log("client-intruder")
    assert "refused this site's key" in fleet.log("client-intruder")

    _wait(lambda: _committed(run, 1), 300, "round 1", fleet)
    # A site goes down mid-run (no --round-timeout given), right after round 1: two
    # rounds are still to come whatever the machine's load (killing it later, after the
    # attack below, raced the run's own end on a busy machine).
    killed_at = time.monotonic()
    fleet.kill("client-c")
    run_id = _run_id(run)
    attempts = _attack_from_outside(tmp_path, port, pki, rogue_key, run_id)
    assert attempts.pop("runtime api")[0] == 403
    for name, (code, output) in attempts.items():
        assert code != 0 and "403 Forbidden" in output, (name, code, output)
    assert not (tmp_path / "evil-ran").exists()  # no code of theirs ran anywhere
    refused = (run / "logs" / "front.log").read_text()
    for path in ["control/list-runs", "control/list-nodes", "control/start-run", "runtime/"]:
        assert f"refused POST '/v1/{path}" in refused

    assert server.wait(600) == 0, fleet.logs()
    # Flower marks the dead site offline about a minute after its last heartbeat; its
    # message is then a failed reply, and no round waits for it to come back
    assert time.monotonic() - killed_at < 240, fleet.logs()

    rows = _rows(run)
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert rows[0]["clients"]["replied"] == 3
    assert rows[0]["train"]["num-examples"] == _train_examples(_site_files(fleet, data))
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


def _run_id(run: Path) -> str:
    """The Flower run id of a `fedml server` run (its run.log names it)."""
    return (run / "logs" / "run.log").read_text().split("Successfully started run ")[1].split()[0]


def _two_sites_past_round_1(fleet: Fleet, rounds: int) -> tuple[subprocess.Popen, Path, int, Path]:
    """A server (`rounds` rounds, both sites' replies needed) and sites a and b, each on
    its own machine, once round 1 is committed: the server process, its PKI, its port
    and its run directory."""
    data = _split(fleet, "ab")
    pki = _pki(fleet, "ab")
    port, run = free_port(), fleet.machine(SERVER) / "run"
    server = _server(
        fleet, "server", port, "--dataset", "npz:shards", "--rounds", str(rounds),
        "--min-replies", "2", "--out", "run",
    )  # fmt: skip
    for site in "ab":
        _client(fleet, site, f"127.0.0.1:{port}", data[site])
    _wait(lambda: _committed(run, 1), 300, "round 1", fleet)
    return server, pki, port, run


def _front_pid(port: int) -> int:
    """The pid of the front (`python -m fedml.deploy.front`) listening on `port`."""
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"fedml.deploy.front" in argv and str(port).encode() in argv:
                return int(proc.name)
    raise AssertionError(f"no front on port {port}")


def test_a_site_whose_supernode_gave_up_during_an_outage_reconnects_and_the_run_finishes(
    tmp_path, fleet
):
    """Issue 34: after TLS handshake timeouts (the front frozen here, as a flood froze
    it there) Flower's SuperNode gives up and stays up, connected to nothing; the site
    restarts it, and the run goes on with the site to its last round."""
    server, _, port, run = _two_sites_past_round_1(fleet, rounds=3)
    front = _front_pid(port)
    os.kill(front, signal.SIGSTOP)  # connections queue; no TLS handshake completes
    try:
        _wait(
            lambda: all("gave up reaching the SuperLink" in fleet.log(f"client-{s}") for s in "ab"),
            180, "both sites' SuperNodes to give up", fleet,
        )  # fmt: skip
    finally:
        os.kill(front, signal.SIGCONT)
    assert server.wait(600) == 0, fleet.logs()
    rows = _rows(run)
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert rows[-1]["stop"] == "max rounds"
    assert rows[-1]["clients"]["aggregated"] == 2, fleet.logs()


def _node_id(site_folder: Path, name: str) -> int:
    """The node id Flower gave site `name` (its SuperNode logs it once it has joined)."""
    log = (site_folder / f"fedml-site-{name}" / "supernode.log").read_text(errors="replace")
    return int(log.split("SuperNode ID: ")[-1].split()[0])


def _forged_push(ca: Path, port: int, key: Path, sender: int, victim: int, run_id: int):
    """What a registered site holding `key` (node `sender`) tries: a message from node 1
    (the SuperLink) to the victim that replies to nothing, which Flower 1.42's SuperLink
    stores as an instruction to the victim. The front's answer."""
    import base64
    import datetime as dt
    import ssl

    import httpx
    from cryptography.hazmat.primitives import serialization
    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from flwr.proto.message_pb2 import Message, Metadata
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    private = serialization.load_ssh_private_key(key.read_bytes(), password=None)
    stamp = dt.datetime.now(dt.timezone.utc).isoformat()
    headers = {
        "flwr-public-key": base64.b64encode(public_key_to_bytes(private.public_key())).decode(),
        "flwr-timestamp": stamp,
        "flwr-signature": base64.b64encode(sign_message(private, stamp.encode())).decode(),
        "content-type": "application/protobuf",
    }
    meta = Metadata(
        run_id=run_id, message_id="f" * 64, src_node_id=1, dst_node_id=victim,
        reply_to_message_id="", message_type="train", ttl=3600,
        created_at=dt.datetime.now(dt.timezone.utc).timestamp(),
    )  # fmt: skip
    body = PushMessagesRequest(node=Node(node_id=sender), messages_list=[Message(metadata=meta)])
    context = ssl.create_default_context(cafile=str(ca))
    with httpx.Client(verify=context, timeout=30) as client:
        return client.post(
            f"https://127.0.0.1:{port}/v1/fleet/push-messages",
            headers=headers, content=body.SerializeToString(),
        )  # fmt: skip


def test_a_registered_site_cannot_push_a_task_to_another_site(tmp_path, fleet):
    """Issue 34's hole 3, as the attacker did it: site a, with its own registered key
    and node id, pushes a Fleet message from node 1 to site b; the front refuses it
    and the run trains on as before."""
    server, pki, port, run = _two_sites_past_round_1(fleet, rounds=2)
    run_id = int(_run_id(run))
    attacker, victim = (
        _node_id(fleet.machine("site-a"), "a"),
        _node_id(fleet.machine("site-b"), "b"),
    )
    answer = _forged_push(
        pki / "ca.crt", port, pki / "sites" / "a" / "node.key", attacker, victim, run_id
    )
    assert answer.status_code == 403, answer.text
    assert "pushed a message from node 1" in answer.text
    assert server.wait(600) == 0, fleet.logs()
    assert "refused '/v1/fleet/push-messages'" in (run / "logs" / "front.log").read_text()
    rows = _rows(run)
    assert [row["clients"]["aggregated"] for row in rows] == [2, 2]


def test_a_killed_server_resumes_from_its_last_commit_and_finishes(tmp_path, fleet):
    """Both sites start from one shared folder (one machine, two sites), each with its
    default state folder: each trains on its own file, as the example counts show."""
    data = _split(fleet, "ab")
    _pki(fleet, "ab")
    shared = fleet.machine("site-ab")  # one machine holding both sites' files
    for site in "ab":
        shutil.move(fleet.machine(f"site-{site}") / site, shared / site)
        shutil.move(fleet.machine(f"site-{site}") / data[site], shared / data[site])
    port, run = free_port(), fleet.machine(SERVER) / "run"
    _server(fleet, "server", port, "--dataset", "npz:shards", "--rounds", "4", "--out", "run")
    for site in "ab":
        _client(fleet, site, f"127.0.0.1:{port}", data[site], machine="site-ab")
    _wait(lambda: _committed(run, 2), 400, "round 2", fleet)
    fleet.kill("server")  # the server machine goes down
    _wait(lambda: not is_locked(run), 60, "the ServerApp to let go of the run", fleet)
    done = _rows(run)[-1]["round"]
    assert done in (2, 3)

    resumed = _server(fleet, "resumed", port, "--resume", "run")
    assert resumed.wait(600) == 0, fleet.logs()
    rows = _rows(run)
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    assert rows[-1]["stop"] == "max rounds"
    assert rows[-1]["server"]["accuracy"] > rows[0]["server"]["accuracy"]
    for site in "ab":
        assert (shared / f"fedml-site-{site}" / "data" / "x.npy").is_file()
        with np.load(shared / data[site]) as original:
            np.testing.assert_array_equal(
                np.load(shared / f"fedml-site-{site}" / "data" / "y.npy"), original["y"]
            )
    for row in rows:
        assert row["clients"]["aggregated"] == 2
        assert row["train"]["num-examples"] == _train_examples([shared / n for n in data.values()])


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
    unmasks only the sum; before round 1 the sites' feature statistics are summed the
    same way (a table: breast-cancer's 30 features)."""
    data = _split(fleet, "abc", "breast-cancer")
    _pki(fleet, "abc")
    port, run = free_port(), fleet.machine(SERVER) / "run"
    server = _server(
        fleet, "server", port, "--dataset", "npz:shards", "--rounds", "2", "--secagg",
        "--out", "run",
    )  # fmt: skip
    for site in "abc":
        _client(fleet, site, f"127.0.0.1:{port}", data[site])
    assert server.wait(600) == 0, fleet.logs()
    rows = _rows(run)
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        secagg = row["secagg"]
        assert (secagg["shared"], secagg["unmasked"], secagg["dropped"]) == (3, 3, 0)
        assert row["clients"]["aggregated"] == 3
    assert rows[-1]["server"]["accuracy"] > 0.85
    # the summed example count is the sites' training splits (20% of each is validation)
    trained = _train_examples(_site_files(fleet, data))
    assert rows[-1]["train"]["num-examples"] == trained
    assert rows[0]["preprocess"] == {"standardized": 30, "sites": 3, "rows": trained,
                                     "masked": True}  # fmt: skip


def _fedml(fleet: Fleet, machine: str, *args: str) -> str:
    """One short `fedml` command on `machine`, as a user types it there; its output."""
    home = fleet.machine(machine)
    done = subprocess.run(
        [sys.executable, "-m", "fedml.cli", *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=home,
        env={**ENV, "HOME": str(home)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


HOSPITALS = ("hospital-a", "hospital-b")


def test_readmes_walkthrough_on_separate_machines_and_a_site_whose_data_does_not_fit(fleet):
    """README's "Deploying at data sites", command by command: the server's folder keeps
    only `pki/` and `shards/test.npz`; each hospital's folder holds what README says to
    copy there. A third site joins with a table of other columns: every one of its
    tasks fails, and the reason names it on its console, the server's and in history."""
    port = free_port()
    _fedml(fleet, SERVER, "certs", "init", "pki", "--host", "superlink.example.org")
    for site in ("hospital-a", "hospital-b", "hospital-c"):
        _fedml(fleet, SERVER, "certs", "add-node", site, "--pki", "pki")
    hint = _fedml(fleet, SERVER, "data", "split", "digits", "--clients", "2", "--out", "shards")
    assert "fedml server --dataset npz:shards" in hint  # the hint names real flags
    server_home = fleet.machine(SERVER)
    for i, site in enumerate(HOSPITALS):  # "copy ... to site A / B"
        home = fleet.machine(site)
        shutil.copytree(server_home / "pki" / "sites" / site, home / site)
        shutil.move(server_home / "shards" / f"client-{i}.npz", home / f"client-{i}.npz")
    assert [p.name for p in (server_home / "shards").iterdir()] == ["test.npz"]
    hospital_c = fleet.machine("hospital-c")
    shutil.copytree(server_home / "pki" / "sites" / "hospital-c", hospital_c / "hospital-c")
    columns = ["age", "glucose", "lactate", "outcome"]  # not the server's 64 pixels
    rows = [",".join(columns)] + [f"{50 + i},{100 + i},{i % 3},{i % 2}" for i in range(40)]
    (hospital_c / "visits.csv").write_text("\n".join(rows) + "\n")

    server = fleet.start(
        "server", SERVER, "server", "--pki", "pki", "--host", "127.0.0.1", "--port", str(port),
        "--dataset", "npz:shards", "--rounds", "3", "--min-replies", "2", "--no-report",
    )  # fmt: skip
    superlink = f"127.0.0.1:{port}"
    for i, site in enumerate(HOSPITALS):
        fleet.start(
            site, site, "client", "--superlink", superlink, "--data", f"client-{i}.npz",
            "--pki", site, "--port", str(free_port()),
        )  # fmt: skip
    fleet.start(
        "hospital-c", "hospital-c", "client", "--superlink", superlink, "--data", "visits.csv",
        "--label-column", "outcome", "--pki", "hospital-c", "--port", str(free_port()),
    )  # fmt: skip
    assert server.wait(600) == 0, fleet.logs()

    run = next((server_home / "runs").iterdir())
    history = _rows(run)
    assert [row["round"] for row in history] == [1, 2, 3]
    files = [
        fleet.machine(s) / f"client-{i}.npz" for i, s in enumerate(("hospital-a", "hospital-b"))
    ]
    why = "site hospital-c: FedmlError: The run's model does not fit this site's data"
    for row in history:
        assert row["clients"]["aggregated"] == 2  # both hospitals, every round
        assert row["train"]["num-examples"] == _train_examples(files)
        assert row["clients"]["failed"] == 1
        [(reason, count)] = row["failed_reasons"].items()
        assert reason.startswith(why) and count == 1
        assert "/" not in reason  # no path of the site's
    assert history[-1]["server"]["accuracy"] > 0.5
    assert why in fleet.log("server")  # the server's console names the site and why
    assert "WARNING: failed in each of the last 3 rounds: " + why in fleet.log("server")
    site_console = fleet.log("hospital-c")
    assert "task failed: train: " + why in site_console
    assert "THIS SITE HAS FAILED ITS LAST 3 TASKS" in site_console
    for site in ("hospital-a", "hospital-b", "hospital-c"):  # the default state folders
        assert (fleet.machine(site) / f"fedml-site-{site}" / "site.json").is_file()
    assert not list(server_home.glob("fedml-site-*"))
    # each site's audit trail: intact, one entry per task, the failures with their reason
    trail = audit.verify(fleet.machine("hospital-c") / "fedml-site-hospital-c")
    failed = [e for e in trail.entries if e["message"] == "train"]
    assert trail.ok and len(failed) == 3
    assert all(e["outcome"] == "failed" and why in e["reason"] for e in failed)
    trail = audit.verify(fleet.machine("hospital-a") / "fedml-site-hospital-a")
    trained = [e for e in trail.entries if e["message"] == "train"]
    assert trail.ok and [e["round"] for e in trained] == [1, 2, 3]
    assert all(e["outcome"] == "done" and e["update_norm"] > 0 for e in trained)
    assert all(e["received"] != e["sent"] and e["metrics"]["num-examples"] > 0 for e in trained)
    served = ssl.PEM_cert_to_DER_cert((server_home / "pki" / "server.crt").read_text())
    # each entry names the server: its address and the certificate the site checked
    assert {e["server"]["certificate_sha256"] for e in trail.entries} == {
        hashlib.sha256(served).hexdigest()
    }
    run_trail = audit.verify(run)  # the server's own trail of the run
    commits = [e for e in run_trail.entries if e["event"] == "commit"]
    assert run_trail.ok and [e["round"] for e in commits] == [1, 2, 3]
    assert [e["event"] for e in run_trail.entries][:2] == ["start", "join"]


def test_raw_hospital_tables_at_separate_machines_are_standardised_and_personal(fleet):
    """Three hospitals, each on its own machine with only its raw CSV (units as
    exported, some cholesterol values missing, the label column 'outcome') and its own
    test rows; the server holds only `pki/` and `tables/test.csv`. Before round 1 the
    sites send their feature sums, never a row; every round then trains on standardised
    rows at every site, the gaps become the federation's mean, and each hospital reports
    the global model's metrics on its own test rows under its key's name, and those of
    the Ditto personal model it keeps in its own state folder (beside its SCAFFOLD
    control variate: the run aggregates with SCAFFOLD)."""
    port = free_port()
    hospitals = ("cleveland", "hungary", "va-long-beach")
    _fedml(fleet, SERVER, "certs", "init", "pki")
    for site in hospitals:
        _fedml(fleet, SERVER, "certs", "add-node", site, "--pki", "pki")
    _fedml(
        fleet, SERVER, "data", "split", "fed-heart-disease", "--format", "csv", "--out", "tables"
    )
    server_home = fleet.machine(SERVER)
    (server_home / "tables" / "switzerland.csv").unlink()
    (server_home / "tables" / "site-tests" / "switzerland.csv").unlink()
    for site in hospitals:
        home = fleet.machine(site)
        shutil.copytree(server_home / "pki" / "sites" / site, home / site)
        own_tests = server_home / "tables" / "site-tests" / f"{site}.csv"
        (home / "mine.csv").write_text(own_tests.read_text().replace(",label\n", ",outcome\n", 1))
        own_tests.unlink()
        lines = (server_home / "tables" / f"{site}.csv").read_text().splitlines()
        header = lines[0].replace(",label", ",outcome")
        rows = [line.split(",") for line in lines[1:]]
        for row in rows[::9]:
            row[3] = ""  # chol missing in every ninth row
        (home / f"{site}.csv").write_text("\n".join([header, *map(",".join, rows)]) + "\n")
        (server_home / "tables" / f"{site}.csv").unlink()
    (server_home / "tables" / "site-tests").rmdir()
    assert [p.name for p in (server_home / "tables").iterdir()] == ["test.csv"]

    server = fleet.start(
        "server", SERVER, "server", "--pki", "pki", "--port", str(port),
        "--dataset", "csv:tables", "--model", "logreg", "--rounds", "3", "--no-report",
        "--personal", "ditto", "--strategy", "scaffold", "--client-momentum", "0",
    )  # fmt: skip
    for site in hospitals:
        fleet.start(
            site, site, "client", "--superlink", f"127.0.0.1:{port}", "--data", f"{site}.csv",
            "--test-data", "mine.csv", "--label-column", "outcome", "--pki", site,
            "--port", str(free_port()),
        )  # fmt: skip
    assert server.wait(600) == 0, fleet.logs()

    history = _rows(next((server_home / "runs").iterdir()))
    trained = sum(n - round(n * 0.2) for n in (199, 172, 85))  # less each validation split
    assert history[0]["preprocess"] == {"standardized": 13, "sites": 3, "rows": trained}
    for row in history:
        assert row["clients"]["aggregated"] == 3 and "failed_reasons" not in row
        assert row["train"]["num-examples"] == trained
    assert history[-1]["server"]["accuracy"] > 0.7  # raw, it stays near the majority class
    assert list(history[-1]["sites"]) == list(hospitals)  # named by their keys
    tested = [history[-1]["sites"][site]["test"]["num-examples"] for site in hospitals]
    assert tested == [104, 89, 45]  # each hospital's own test rows, evaluated at the site
    assert 0.5 < history[-1]["sites"]["cleveland"]["test"]["auroc"] <= 1.0
    # Ditto's personal models stay at the sites: a file in each one's state folder
    for site in hospitals:
        assert history[-1]["sites"][site]["personal"]["test"]["num-examples"] > 0
        for kept in ("personal-ditto", "scaffold-control"):  # and SCAFFOLD's c_i
            found = list((fleet.machine(site) / f"fedml-site-{site}").glob(f"{kept}-*"))
            assert len(found) == 1 and found[0].stat().st_size > 0
    assert not list(server_home.rglob("personal-*")) + list(server_home.rglob("scaffold-*"))
