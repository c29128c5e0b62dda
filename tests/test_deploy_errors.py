"""Deployment mistakes a new user makes get one clear error, fast, instead of a hang;
the server's public port answers only what sites need. Real `fedml` processes on
loopback, each wait bounded, every process killed by process group at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedml.deploy.processes import free_port

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


@contextlib.contextmanager
def _started(*args: str, log: Path):
    """A `python -m fedml.cli ...` or other module process in its own session."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT, env=ENV,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


def _fedml(*args: str, timeout: float = 60) -> tuple[int, str, float]:
    """Run `fedml ARGS` to its end: exit code, output, seconds."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "fedml.cli", *args],
        capture_output=True, text=True, env=ENV, timeout=timeout, check=False,
    )  # fmt: skip
    return (
        done.returncode,
        " ".join((done.stdout + done.stderr).split()),
        (time.monotonic() - started),
    )


@pytest.fixture
def listening():
    """A port something already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def site(tmp_path):
    """A site's data and PKI folder."""
    import numpy as np

    from fedml.pki import add_node, init_pki

    init_pki(tmp_path / "pki")
    add_node(tmp_path / "pki", "a")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", x=rng.normal(size=(40, 4)), y=np.arange(40) % 2)
    return tmp_path


def _wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    from fedml.deploy.processes import port_open

    deadline = time.monotonic() + 60
    while not port_open("127.0.0.1", port):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def test_a_second_server_on_a_taken_port_says_so_before_starting_anything(listening):
    code, out, seconds = _fedml("server", "--insecure", "--port", str(listening))
    assert code == 2, out
    assert f"Cannot listen on 127.0.0.1:{listening}" in out and "--port" in out
    assert "Traceback" not in out and seconds < 30


def test_a_second_client_on_a_taken_local_port_names_the_port_option(site, listening):
    code, out, seconds = _fedml(
        "client", "--insecure", "--superlink", f"127.0.0.1:{free_port()}",
        "--data", str(site / "a.npz"), "--state-dir", str(site / "s"), "--port", str(listening),
    )  # fmt: skip
    assert code == 2, out
    assert f"Port {listening} on this machine is in use" in out and "--port" in out
    assert seconds < 30  # it did not wait for the (absent) SuperLink


@pytest.mark.parametrize("pki", [None, "missing-folder"])
def test_a_client_checks_its_own_pki_folder_before_the_network(site, pki):
    args = [] if pki is None else ["--pki", str(site / pki)]
    code, out, seconds = _fedml(
        "client", "--superlink", f"127.0.0.1:{free_port()}", "--data", str(site / "a.npz"),
        "--state-dir", str(site / "s"), "--port", str(free_port()), *args,
    )  # fmt: skip
    assert code == 2, out
    assert ("needs --pki" in out) if pki is None else ("missing-folder" in out)
    assert seconds < 30  # not the 60 s join timeout


def test_an_insecure_client_against_a_tls_server_and_the_reverse_fail_naming_the_mismatch(
    site,
):
    """The front answers TLS with the server's certificate (or plain HTTP with
    --insecure); a site speaking the other fails at once instead of retrying forever."""
    pki, tls_port, plain_port = site / "pki", free_port(), free_port()
    backend = f"http://127.0.0.1:{free_port()}"  # nothing behind: the handshake is all
    tls = ["--certfile", str(pki / "server.crt"), "--keyfile", str(pki / "server.key")]
    front = ("fedml.deploy.front", "--host", "127.0.0.1", "--backend", backend)
    with (
        _started(*front, "--port", str(tls_port), *tls, log=site / "tls.log") as tls_front,
        _started(*front, "--port", str(plain_port), log=site / "plain.log") as plain_front,
    ):
        _wait_for_port(tls_port, tls_front, site / "tls.log")
        _wait_for_port(plain_port, plain_front, site / "plain.log")
        common = ["--data", str(site / "a.npz")]
        code, out, seconds = _fedml(
            "client", "--insecure", "--superlink", f"127.0.0.1:{tls_port}", *common,
            "--state-dir", str(site / "s-insecure"),
            "--port", str(free_port()),
        )  # fmt: skip
        assert code == 2 and "speaks TLS" in out and "--pki" in out, out
        assert seconds < 30
        code, out, seconds = _fedml(
            "client", "--pki", str(pki / "sites" / "a"), "--superlink",
            f"127.0.0.1:{plain_port}", *common, "--state-dir", str(site / "s-key"),
            "--port", str(free_port()),
        )  # fmt: skip
        assert code == 2 and "--insecure" in out and "TLS" in out, out
        assert seconds < 30


def test_the_front_answers_health_and_refuses_everything_but_the_fleet_api():
    from starlette.testclient import TestClient

    from fedml.deploy.front import REFUSED, fleet_paths, make_front

    backend = f"http://127.0.0.1:{free_port()}"  # down: a forwarded call is a 502
    with TestClient(make_front(backend, verify=False, tls=True)) as client:
        assert client.get("/health").json() == {"service": "fedml-server", "tls": True}
        refused = [
            ("POST", "/v1/control/start-run"),
            ("POST", "/v1/control/list-runs"),
            ("POST", "/v1/control/stop-run"),
            ("POST", "/v1/control/register-node"),
            ("POST", "/v1/runtime/acquire-task"),
            ("POST", "/v1/fleet/../control/list-runs"),
            ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
            ("POST", "/v1/fleet/pull-messages?x=1"),
            ("GET", "/v1/fleet/pull-messages"),
            ("POST", "/docs"),
            ("GET", "/openapi.json"),
        ]
        for method, path in refused:
            response = client.request(method, path)
            assert response.status_code == 403 and response.text == REFUSED, (method, path)
        assert client.post("/v1/fleet/pull-messages").status_code == 502
        forged = {"x-forwarded-for": "10.0.0.1"}  # dropped, never believed
        assert client.post("/v1/fleet/pull-messages", headers=forged).status_code == 502
    paths = fleet_paths()
    assert "/v1/fleet/pull-messages" in paths and "/v1/fleet/push-messages" in paths
    assert all(p.startswith("/v1/fleet/") for p in paths)


def _signed(key_file: Path, age: float = 0.0) -> dict[str, str]:
    """The headers a SuperNode with this private key sends (Flower's node auth)."""
    import base64
    import datetime as dt

    from cryptography.hazmat.primitives import serialization
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    key = serialization.load_ssh_private_key(key_file.read_bytes(), password=None)
    stamp = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=age)).isoformat()
    return {
        "flwr-public-key": base64.b64encode(public_key_to_bytes(key.public_key())).decode(),
        "flwr-timestamp": stamp,
        "flwr-signature": base64.b64encode(sign_message(key, stamp.encode())).decode(),
    }


def _rsa_key() -> str:
    """A public key of a type Flower's node auth does not use (EC only)."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(pem).decode()


def test_with_node_auth_the_front_lets_through_only_calls_signed_by_a_registered_site(site):
    from starlette.testclient import TestClient

    from fedml.deploy.front import MAX_BODY_BYTES, make_front, registered_keys
    from fedml.pki import add_node

    pki = site / "pki"
    add_node(pki, "rogue")
    (pki / "nodes" / "rogue.pub").unlink()  # a key the server never registered
    keys = registered_keys(pki / "nodes")
    assert len(keys) == 1
    backend = f"http://127.0.0.1:{free_port()}"  # down: a forwarded call is a 502
    path = "/v1/fleet/pull-messages"
    with TestClient(make_front(backend, verify=False, tls=True, node_keys=keys)) as client:
        assert (
            client.post(path, headers=_signed(pki / "sites" / "a" / "node.key")).status_code == 502
        )
        for headers in [
            {},
            _signed(pki / "sites" / "rogue" / "node.key"),
            _signed(pki / "sites" / "a" / "node.key", age=3600),  # a replayed old call
            {**_signed(pki / "sites" / "a" / "node.key"), "flwr-signature": "AAAA"},
            {**_signed(pki / "sites" / "a" / "node.key"), "flwr-public-key": _rsa_key()},
        ]:
            assert client.post(path, headers=headers, content=b"x").status_code == 401
        # an unregistered site trying to join hears what the SuperLink would say
        join = client.post(
            "/v1/fleet/activate-node", headers=_signed(pki / "sites" / "rogue" / "node.key")
        )
        assert join.status_code == 412 and "Failed to activate SuperNode" in join.text
        too_large = {**_signed(pki / "sites" / "a" / "node.key")}
        too_large["content-length"] = str(MAX_BODY_BYTES + 1)
        assert client.post(path, headers=too_large).status_code == 413


def test_stale_work_folders_of_dead_servers_are_swept_and_live_ones_kept():
    from fedml.deploy.server import OWNER_FILE, WORK_PREFIX, sweep_stale_work_folders

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Path(tempfile.mkdtemp(prefix=WORK_PREFIX))
    (stale / OWNER_FILE).write_text(str(dead.pid))
    live = Path(tempfile.mkdtemp(prefix=WORK_PREFIX))
    (live / OWNER_FILE).write_text(str(os.getppid()))
    try:
        removed = sweep_stale_work_folders()
        assert stale in removed and not stale.exists()
        assert live.exists()
    finally:
        for folder in (stale, live):
            subprocess.run(["rm", "-rf", str(folder)], check=False)


def _follow_while_held(run: Path, tmp_path: Path, start_round: int = 0) -> tuple[bool, bool, bool]:
    """Follow `run` with stand-ins for `flwr run` and the SuperLink that never end, while
    this test holds the run's lock as a ServerApp does, then lets go. Returns: still
    following while held; still following 5 s after the release (then `flwr run` is
    ended); what follow_rounds returned."""
    import fcntl
    import threading

    from fedml.deploy.launch import follow_rounds
    from fedml.deploy.processes import Child

    forever = [sys.executable, "-c", "import time; time.sleep(120)"]
    flwr_run = Child("flwr run", forever, tmp_path / "flwr-run.log", ENV)
    superlink = Child("SuperLink", forever, tmp_path / "superlink.log", ENV)
    lock = (run / ".lock").open("a+")
    fcntl.flock(lock, fcntl.LOCK_EX)
    result: dict[str, bool] = {}

    def follow() -> None:
        result["over"] = follow_rounds(run, flwr_run, superlink, start_round, None)

    follower = threading.Thread(target=follow)
    try:
        follower.start()
        time.sleep(2.0)  # time for the follower to see the lock held, on a busy machine too
        following_while_held = follower.is_alive()
        lock.close()  # the ServerApp lets go of the run directory
        follower.join(5.0)
        following_after = follower.is_alive()
        flwr_run.stop(grace=0.0)  # a follow that goes on ends with `flwr run`
        follower.join(5.0)
        return following_while_held, following_after, result["over"]
    finally:
        flwr_run.stop(grace=0.0)
        superlink.stop(grace=0.0)


def test_following_a_run_ends_when_its_directory_says_it_finished_not_flowers_shutdown(
    tmp_path,
):
    """After the last commit Flower still shuts Ray down and streams its last log lines
    (seconds): `fedml simulate --engine ray` and `fedml server` stop waiting as soon as
    the ServerApp has let go of a run that finished during the follow; any other run is
    followed until `flwr run` ends."""
    import shutil

    from fedml.config import load_config
    from simulations.engine import simulate

    run = tmp_path / "run"
    simulate(load_config(None, {"rounds": 1, "simulation.clients": 2, "out": str(run)}))
    assert _follow_while_held(run, tmp_path / "finished") == (True, False, True)
    # resumed to go further, its ServerApp let go without committing: its earlier stop
    # reason is not this run's end
    assert _follow_while_held(run, tmp_path / "resumed", start_round=1) == (True, True, False)

    shutil.rmtree(run / "commits")  # as if its ServerApp had died before any commit
    assert _follow_while_held(run, tmp_path / "unfinished") == (True, True, False)


def test_sigterm_stops_the_server_cleanly_and_leaves_no_work_folder(tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    server_args = (
        "fedml.cli", "server", "--insecure", "--port", str(port), "--sites", "1",
        "--wait-for-sites", "120", "--out", str(tmp_path / "run"), "--no-report",
    )  # fmt: skip
    with _started(*server_args, log=log) as server:
        _wait_for_port(port, server, log)
        deadline = time.monotonic() + 60
        while "sites online" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        work = [
            p
            for p in Path(tempfile.gettempdir()).glob("fedml-server-*")
            if (p / "owner.pid").is_file() and (p / "owner.pid").read_text() == str(server.pid)
        ]
        assert len(work) == 1
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 130, log.read_text()
        assert not work[0].exists()
        from fedml.deploy.processes import group_members, port_open

        assert not port_open("127.0.0.1", port)  # the front is gone
        assert group_members(server.pid) == []  # and everything it started


def test_a_run_resumes_only_the_way_it_started(tmp_path):
    from fedml.config import load_config
    from fedml.errors import FedmlError
    from fedml.runstore import RunStore, open_resume, run_status

    for deployed in (True, False):
        path = tmp_path / f"run-{deployed}"
        RunStore.create(path, load_config(None, {}), deployed=deployed).close()
        other = "fedml server --resume" if deployed else "fedml simulate --resume"
        with pytest.raises(FedmlError, match=other):
            open_resume(path, {}, deployed=not deployed)
        store, _ = open_resume(path, {}, deployed=deployed)
        assert store.deployed is deployed
        assert run_status(path).resume_command.startswith(other)
