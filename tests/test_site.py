"""A data site runs only fedml's own ClientApp, the one installed at the site.

Fast tests check the site's app check on real Flower app bundles (built by Flower's own
builder, as `flwr run` builds them) and pin the Flower internals the site executor uses.
The slow test is the attack itself, with real processes on loopback: a SuperLink we
control (what a compromised server could do) submits a foreign app to a `fedml client`
site; the site refuses it without importing it and still serves a fedml run afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_files

from fedml.config import load_config
from fedml.deploy.app_check import config_refusal, fab_refusal, message_refusal
from fedml.deploy.launch import write_app

MANIFEST = ".info/CONTENT"


def _fedml_files(tmp_path: Path, **config) -> dict[str, bytes]:
    """The files of the app `fedml server` submits (only its pyproject.toml)."""
    app = write_app(tmp_path / "app", load_config(None, config), resume=False)
    return {"pyproject.toml": (app / "pyproject.toml").read_bytes()}


def _fab(files: dict[str, bytes]) -> bytes:
    return build_fab_from_files(files)[0]


def test_fedmls_own_config_only_app_is_accepted(tmp_path):
    fab = _fab(_fedml_files(tmp_path))
    import io
    import zipfile

    assert MANIFEST in zipfile.ZipFile(io.BytesIO(fab)).namelist()  # Flower's builder adds it
    assert fab_refusal(fab) is None


def test_an_app_carrying_code_is_refused_even_when_it_names_fedmls_components(tmp_path):
    files = _fedml_files(tmp_path)
    # a file that would shadow the installed ClientApp if the bundle were put on sys.path
    files["clients/app.py"] = b"import os\nos.system('touch /tmp/pwned')\n"
    why = fab_refusal(_fab(files))
    assert why is not None and "carries files (clients/app.py)" in why


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('clientapp = "clients.app:app"', 'clientapp = "evil:app"', "names ClientApp 'evil:app'"),
        ('publisher = "fedml"', 'publisher = "mallory"', "publisher 'mallory'"),
    ],
)
def test_an_app_naming_another_clientapp_or_publisher_is_refused(tmp_path, old, new, expected):
    files = _fedml_files(tmp_path)
    text = files["pyproject.toml"].decode()
    assert old in text
    files["pyproject.toml"] = text.replace(old, new).encode()
    why = fab_refusal(_fab(files))
    assert why is not None and expected in why


@pytest.mark.parametrize("fab", [b"", b"not a zip", b"PK\x03\x04" + b"\x00" * 40, b"x" * (2 << 20)])
def test_a_damaged_or_oversized_bundle_is_refused_not_raised(fab):
    assert fab_refusal(fab) is not None


def _encrypted(fab: bytes) -> bytes:
    """`fab` with every entry marked encrypted (zipfile cannot write encrypted zips)."""
    data = bytearray(fab)
    for header, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = data.find(header)
        while start != -1:
            data[start + flags_at] |= 0x01
            start = data.find(header, start + 4)
    return bytes(data)


def test_a_hostile_bundle_that_makes_zip_or_toml_raise_is_refused_with_a_reason(tmp_path):
    """Issue 34: a pyproject nested 20,000 deep (RecursionError) and an encrypted zip
    (RuntimeError) raised out of the site's check instead of refusing."""
    import io
    import zipfile

    nested = io.BytesIO()  # Flower's own builder would refuse to build it
    with zipfile.ZipFile(nested, "w") as bundle:
        bundle.writestr("pyproject.toml", b"a = " + b"[" * 20_000 + b"]" * 20_000 + b"\n")
    why = fab_refusal(nested.getvalue())
    assert why is not None and "RecursionError" in why
    why = fab_refusal(_encrypted(_fab(_fedml_files(tmp_path))))
    assert why is not None and "encrypted" in why


def test_models_a_site_builds_are_the_built_ins_and_those_it_allows():
    from fedml.config import MODELS
    from fedml.deploy.app_check import BUILTIN_MODELS
    from fedml.models import BUILTIN

    # the config's and the site check's copies (neither may import torch)
    assert set(BUILTIN) == BUILTIN_MODELS == set(MODELS)
    assert all(load_config(None, {"model.name": name}).model.name == name for name in BUILTIN)
    assert all(config_refusal({"model.name": name}, []) is None for name in BUILTIN)
    assert config_refusal({"model.name": "mypkg.nets:resnet"}, ["mypkg.nets:resnet"]) is None
    for name in ["os:system", "shutil:rmtree", "", 3]:
        why = config_refusal({"model.name": name}, ["mypkg.nets:resnet"])
        assert why is not None and "--allow-model" in why
    assert config_refusal({}, []) is not None


def test_node_state_is_refused_at_a_site():
    from fedml.node_state import STATE_MARKER

    assert message_refusal(["arrays", "config"]) is None
    assert "node state" in message_refusal(["arrays", STATE_MARKER])


def test_the_flower_internals_the_site_uses_are_where_we_expect():
    """A Flower upgrade that moves them fails here, not at a site."""
    import inspect

    from fedml.deploy import flower_runtime as runtime

    clientapp = runtime._clientapp
    assert list(inspect.signature(clientapp.pull_task_input).parameters) == ["client"]
    assert list(inspect.signature(clientapp.push_message).parameters) == [
        "client", "message", "context"
    ]  # fmt: skip
    assert list(inspect.signature(clientapp.push_task_output).parameters) == [
        "client", "context", "sub_status", "details"
    ]  # fmt: skip
    assert hasattr(runtime.RuntimeHttpClient, "AcquireTask")
    assert runtime.TaskType.CLIENT_APP == "flwr-clientapp"


EVIL_APP = '''
"""A foreign app: its ClientApp would list the site's data folder and send it back."""
import json
import os
import sys
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

MARKER = Path("MARKER_PATH")
with MARKER.open("a") as marker:  # who imported this module
    marker.write(sys.argv[0] + "\\n")

client = ClientApp()


@client.query()
def steal(msg: Message, context: Context) -> Message:
    folder = os.path.dirname(str(context.node_config["data-path"]))
    loot = ConfigRecord({"files": json.dumps(sorted(os.listdir(folder)))})
    return Message(RecordDict({"loot": loot}), reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 120
    nodes = []
    while not nodes and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]
    out = []
    for reply in grid.send_and_receive(messages, timeout=120):
        if reply.has_error():
            out.append({"code": reply.error.code, "reason": reply.error.reason})
        else:
            out.append({"content": {k: dict(v) for k, v in reply.content.items()}})
    Path(context.run_config["out"]).write_text(json.dumps(out))
'''


def _evil_app(folder: Path, out: Path) -> Path:
    """The foreign app's folder, as its author would `flwr run` it."""
    folder.mkdir(parents=True)
    marker = folder.parent / "imported-by.txt"
    (folder / "stock_app.py").write_text(EVIL_APP.replace("MARKER_PATH", str(marker)))
    (folder / "pyproject.toml").write_text(
        '[project]\nname = "evil"\nversion = "1.0.0"\ndescription = ""\nlicense = "MIT"\n'
        'dependencies = []\n[tool.flwr.app]\npublisher = "mallory"\n'
        '[tool.flwr.app.components]\nserverapp = "stock_app:server"\n'
        f'clientapp = "stock_app:client"\n[tool.flwr.app.config]\nout = "{out}"\n'
    )
    return folder


def _assert_other_local_processes_cannot_take_tasks(runtime_api: str) -> None:
    """Without the site executor's secret, the SuperNode hands out no task."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.runtime import RuntimeHttpClient

    deadline = time.monotonic() + 60
    while True:  # the Runtime API is up shortly after the SuperNode starts
        client = RuntimeHttpClient.from_server_address(
            server_address=runtime_api, insecure=True, root_certificates=None, interceptors=[]
        )
        try:
            client.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-clientapp"]))
        except httpx.HTTPStatusError as exc:
            assert exc.response.status_code in (401, 403)
            return
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the SuperNode's Runtime API never came up"
            time.sleep(0.5)
            continue
        finally:
            client.close()
        raise AssertionError("a process without the secret was answered")


def _site_shard(path: Path) -> Path:
    """One site's private data: client 0 of the digits federation."""
    import numpy as np

    from fedml.data import federation_for

    shard = federation_for(load_config(None, {"simulation.clients": 2})).client(0)
    np.savez(path, x=shard.x, y=shard.y)
    return path


def _wait_for(predicate, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    shown = "\n".join(
        f"--- {p}:\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists()
    )
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{shown}")


@pytest.mark.slow
def test_a_site_refuses_a_foreign_app_without_importing_it_and_still_serves_fedml(tmp_path):
    from fedml.config import SERVER_LOCAL_ENV
    from fedml.deploy.launch import CONNECTION, start_superlink, submit, write_flower_config
    from fedml.deploy.processes import flower_command, flower_env, free_port, run_quietly

    port, home = free_port(), tmp_path / "flwr-home"
    write_flower_config(home, f"127.0.0.1:{port}", None)
    run = tmp_path / "run"
    one_site = {"participation.min_replies": 1, "strategy.min_train_clients": 1}
    one_site["strategy.min_evaluate_clients"] = 1
    cfg = load_config(None, {"rounds": 1, "out": str(run), **one_site})
    # as `fedml server` does: the ServerApp's own paths reach it through its environment
    env = {**flower_env(home), SERVER_LOCAL_ENV: json.dumps(cfg.server_local())}
    # the SuperLink a compromised server would run: ours to submit anything through
    superlink = start_superlink("127.0.0.1", port, tmp_path / "superlink.log", env, ["--insecure"])
    site_log = tmp_path / "site.log"
    state = tmp_path / "site-state"
    site_port = free_port()
    site = None
    try:
        with site_log.open("wb") as log:
            site = subprocess.Popen(
                [
                    sys.executable, "-m", "fedml.cli", "client", "--insecure",
                    "--superlink", f"127.0.0.1:{port}",
                    "--data", str(_site_shard(tmp_path / "site.npz")),
                    "--state-dir", str(state), "--port", str(site_port),
                ],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        logs = [site_log, state / "supernode.log", state / "executor.log", superlink.log]
        _wait_for(lambda: "SuperNode started" in site_log.read_text(), 120, "the site", logs)
        _assert_other_local_processes_cannot_take_tasks(f"127.0.0.1:{site_port}")

        evil = _evil_app(tmp_path / "evil" / "app", tmp_path / "loot.json")
        run_quietly([*flower_command("flwr"), "run", str(evil), CONNECTION, "--stream"], env, 300)

        replies = json.loads((tmp_path / "loot.json").read_text())
        assert len(replies) == 1 and "content" not in replies[0], replies  # nothing came back
        assert replies[0]["code"] == 7  # Flower's ErrorCode.INVALID_FAB
        assert "carries files (stock_app.py)" in replies[0]["reason"]
        imported_by = (tmp_path / "evil" / "imported-by.txt").read_text().splitlines()
        assert imported_by and all("serverapp" in argv for argv in imported_by), imported_by
        assert "fedml site refused run" in (state / "executor.log").read_text()

        # the same site still serves fedml's own app
        app = write_app(tmp_path / "fedml-app", cfg, resume=False)
        flwr_run = submit(app, tmp_path / "logs", env)
        try:
            assert flwr_run.wait(180) == 0, flwr_run.tail()
        finally:
            flwr_run.stop()
        rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        assert rows[0]["round"] == 1 and rows[0]["clients"]["replied"] == 1, rows
    finally:
        if site is not None:
            os.killpg(site.pid, signal.SIGKILL)
            site.wait(30)
        superlink.stop()


def test_a_task_whose_executor_is_gone_ends_at_once_instead_of_retrying_for_ever():
    """Its SuperNode is gone too (a site machine's fedml client was SIGKILLed): the task
    must not sit there retrying to report to it, holding a PyTorch process's memory."""
    from fedml.deploy.processes import free_port

    executor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    task = subprocess.Popen(
        [sys.executable, "-m", "fedml.deploy.site_task",
         "--runtime-api-address", f"127.0.0.1:{free_port()}",  # nothing listens there
         "--parent-pid", str(executor.pid)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        task.stdin.write(b"a-token\n")
        task.stdin.close()
        executor.wait(30)
        assert task.wait(30) == 3  # ended by its watch on the executor
    finally:
        task.kill()
        task.wait(30)


TASKS_RUN_HERE = 0  # a module-level counter, as a ClientApp might keep one


def test_each_task_runs_in_a_fresh_fork_and_nothing_it_changes_reaches_the_next(tmp_path):
    """The executor forks each task from its warm state: two tasks run in two new
    processes, children of the executor, and a module-level counter that each task
    increments is 1 in both (the first task's change died with it)."""
    from fedml.deploy import site_executor

    seen = tmp_path / "tasks.txt"

    def task(runtime_api_address: str, token: str, executor_pid: int) -> int:
        global TASKS_RUN_HERE
        TASKS_RUN_HERE += 1
        with seen.open("a") as out:
            out.write(f"{token} {os.getpid()} {executor_pid} {TASKS_RUN_HERE}\n")
        return 0

    original = site_executor.run_task
    site_executor.run_task = task
    try:
        pids = [site_executor.fork_task("127.0.0.1:1", token) for token in ("t1", "t2")]
    finally:
        site_executor.run_task = original
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    lines = [line.split() for line in seen.read_text().splitlines()]
    assert sorted(token for token, *_ in lines) == ["t1", "t2"]
    assert {int(pid) for _, pid, _, _ in lines} == set(pids) and os.getpid() not in pids
    assert all(int(parent) == os.getpid() for _, _, parent, _ in lines)
    assert [count for *_, count in lines] == ["1", "1"]
    assert TASKS_RUN_HERE == 0  # and nothing came back into the executor


def test_the_executor_warms_up_without_starting_pytorchs_thread_pool():
    """Forking is safe only if the executor has not started PyTorch's intra-op threads
    (or opened a device) before: warm_up only imports."""
    probe = (
        "import os; from fedml.deploy.site_executor import warm_up; warm_up(); "
        "import sys, torch; print(len(os.listdir('/proc/self/task')), "
        "'torch._dynamo' in sys.modules, 'clients.app' in sys.modules, "
        "torch.cuda.is_initialized())"
    )
    before = subprocess.run(
        [sys.executable, "-c", "import os, numpy; print(len(os.listdir('/proc/self/task')))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    after = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    threads, dynamo, app, cuda = after.stdout.split()
    assert int(threads) == int(before.stdout)  # NumPy's BLAS pool only, no more
    assert (dynamo, app, cuda) == ("True", "True", "False")
