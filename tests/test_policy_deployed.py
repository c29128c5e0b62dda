"""The site decides, tested as an attacker would try it: real processes on loopback.

A data site (`fedml client --policy policy.toml`, in its own folder: its working
directory and HOME, relative paths) joins a SuperLink that we control. A compromised
server's ServerApp (Flower's stock Grid, behind fedml's own config-only app so that the
site's app check lets it through) asks the site to train without DP, with too little
noise, with a model the site does not allow, for more epochs, with tiny batches, and for
a round that would cross the site's per-run budget: each is refused with its rule named,
and inotify shows that none of the site's data files was opened. An honest DP run within
the budget trains, and the site's ledger, the server's history and Opacus's accountant
agree on epsilon. After a restart, another run that would cross the site's lifetime
budget is refused, the reason in the site's console, its audit trail and the server's
history, and the ledger is unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from file_watch import OpenWatch

from fedml import audit
from fedml.config import SERVER_LOCAL_ENV, load_config
from fedml.data import federation_for
from fedml.data.datasets import validation_size
from fedml.deploy.launch import CONNECTION, start_superlink, submit, write_app, write_flower_config
from fedml.deploy.processes import Child, flower_command, flower_env, free_port, run_quietly
from fedml.privacy import default_delta, epsilon_of
from fedml.privacy_ledger import SiteLedger

pytestmark = pytest.mark.slow

HOSTILE = '''
"""A compromised server's ServerApp: Flower's stock Grid, any message it likes."""
import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    plan = json.loads(Path("PLAN_PATH").read_text())
    deadline = time.monotonic() + 60
    nodes = []
    while not nodes and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.2)
    out = []
    for config in plan["messages"]:
        content = RecordDict(
            {"arrays": ArrayRecord(), "config": ConfigRecord({"server-round": 1, **config})}
        )
        message = Message(content, dst_node_id=nodes[0], message_type="train")
        for reply in grid.send_and_receive([message], timeout=120):
            if reply.has_error():
                out.append({"code": reply.error.code, "reason": reply.error.reason})
            else:
                out.append({"content": sorted(reply.content.keys())})
    Path(plan["out"]).write_text(json.dumps(out))
'''

ONE_SITE = {
    "participation.min_replies": 1,
    "strategy.min_train_clients": 1,
    "strategy.min_evaluate_clients": 1,
    "model.name": "logreg",
    "client.local_epochs": 1,
}
DP = {"dp.mode": "sample", "dp.noise_multiplier": 1.0}


class Deployment:
    """A SuperLink (the server machine's folder) and one site (its own folder)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server = root / "server"
        self.site = root / "site-a"
        for folder in (self.server, self.site):
            folder.mkdir()
        self.port = free_port()
        self.site_port = free_port()
        home = self.server / "flwr-home"
        write_flower_config(home, f"127.0.0.1:{self.port}", None)
        self.hostile = root / "hostile-code"  # on the server machine's PYTHONPATH only
        self.hostile.mkdir()
        self.env = {**flower_env(home), "HOME": str(self.server), "PYTHONPATH": str(self.hostile)}
        self.superlink: Child | None = None
        self.process: subprocess.Popen | None = None
        self.console = root / "site-console.log"

    def start_superlink(self, run: str) -> None:
        """A fresh SuperLink whose ServerApps write fedml's run directory `run` (a
        ServerApp's server-side paths come through the SuperLink's environment)."""
        if self.superlink is not None:
            self.superlink.stop()
        local = load_config(None, {"out": str(self.server / run)}).server_local()
        env = {**self.env, SERVER_LOCAL_ENV: json.dumps(local)}
        log = self.server / f"superlink-{run}.log"
        self.superlink = start_superlink("127.0.0.1", self.port, log, env, ["--insecure"])

    def start_site(self) -> None:
        offset = self.console.stat().st_size if self.console.exists() else 0
        with self.console.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "fedml.cli", "client", "--insecure",
                    "--superlink", f"127.0.0.1:{self.port}", "--data", "client-0.npz",
                    "--policy", "policy.toml", "--state-dir", "state",
                    "--port", str(self.site_port),
                ],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.site, start_new_session=True,
                env={**flower_env(self.site / "flwr-home"), "HOME": str(self.site)},
            )  # fmt: skip
        self.wait(lambda: "SuperNode started" in self.site_console()[offset:], 120, "the site")

    def stop_site(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def site_console(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.5)
        logs = [self.console, self.site / "state" / "executor.log"]
        shown = "\n".join(f"--- {p}:\n{p.read_text(errors='replace')[-3000:]}" for p in logs)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{shown}")

    def hostile_run(self, name: str, overrides: dict, messages: list[dict]) -> list[dict]:
        """Submit fedml's config-only app naming the hostile ServerApp; its replies."""
        plan, out = self.root / f"{name}-plan.json", self.root / f"{name}-replies.json"
        plan.write_text(json.dumps({"messages": messages, "out": str(out)}))
        (self.hostile / "hostile_server.py").write_text(HOSTILE.replace("PLAN_PATH", str(plan)))
        cfg = load_config(None, {"rounds": 1, **ONE_SITE, **overrides})
        app = write_app(self.root / name, cfg, resume=False)
        text = (app / "pyproject.toml").read_text()
        (app / "pyproject.toml").write_text(text.replace("fedml.server:app", "hostile_server:app"))
        run_quietly(
            [*flower_command("flwr"), "run", str(app), CONNECTION, "--stream"], self.env, 300
        )
        return json.loads(out.read_text())

    def honest_run(self, name: str, overrides: dict) -> list[dict]:
        """A fedml run (the server's own ServerApp); its history rows."""
        run = self.server / name
        cfg = load_config(None, {"out": str(run), **ONE_SITE, **overrides})
        env = {**self.env, SERVER_LOCAL_ENV: json.dumps(cfg.server_local())}
        flwr_run = submit(
            write_app(self.server / f"{name}-app", cfg, resume=False), run / "logs", env
        )
        try:
            assert flwr_run.wait(300) == 0, flwr_run.tail()
        finally:
            flwr_run.stop()
        return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]

    def close(self) -> None:
        self.stop_site()
        if self.superlink is not None:
            self.superlink.stop()


@pytest.fixture
def deployment(tmp_path):
    started = Deployment(tmp_path)
    try:
        yield started
    finally:
        started.close()


def test_a_policy_bound_site_refuses_a_hostile_server_and_keeps_its_budget(deployment):
    site = deployment.site
    shard = federation_for(load_config(None, {"simulation.clients": 2})).client(0)
    np.savez(site / "client-0.npz", x=shard.x, y=shard.y)
    rows = len(shard) - validation_size(len(shard), 0.2)  # what the site trains on
    batches = math.ceil(rows / 32)  # a pass of batches of 32 (Poisson rate 1/batches)
    delta = default_delta(rows)

    def spent(noise: float, passes: int) -> float:
        return epsilon_of(((noise, 1 / batches, passes * batches),), "rdp", delta)

    honest = spent(1.0, 2)  # the honest run: 2 rounds of 1 epoch at noise 1.0
    # just above it: a third pass, or two at noise 0.8, crosses the budget
    limit = honest + 0.25 * min(spent(0.8, 2) - honest, spent(1.0, 3) - honest)
    (site / "policy.toml").write_text(
        f'[privacy]\nrequire = "sample"\nmin_noise_multiplier = 0.8\n'
        f"max_epsilon_per_run = {limit}\nmax_epsilon_total = {limit}\nmin_batch_size = 16\n"
        f'[training]\nmodels = ["logreg"]\nmax_local_epochs = 2\n'
    )
    deployment.start_superlink("run-a")
    deployment.start_site()
    data_files = [site / "client-0.npz", site / "state" / "data" / "x.npy"]
    data_files.append(site / "state" / "data" / "y.npy")
    with OpenWatch(data_files) as watch:
        refusals = [
            *deployment.hostile_run("no-dp", {}, [{}]),
            *deployment.hostile_run("little-noise", {**DP, "dp.noise_multiplier": 0.5}, [{}]),
            *deployment.hostile_run("other-model", {**DP, "model.name": "mlp"}, [{}]),
            *deployment.hostile_run(
                "overreach",
                {**DP, "dp.noise_multiplier": 0.8},
                [{"local-epochs": 50}, {"batch-size": 2}, {"local-epochs": 2}],
            ),
        ]
        rules = [
            "privacy.require", "privacy.min_noise_multiplier", "training.models",
            "training.max_local_epochs", "privacy.min_batch_size", "privacy.max_epsilon_per_run",
        ]  # fmt: skip
        assert len(refusals) == len(rules), refusals
        for reply, rule in zip(refusals, rules, strict=True):
            assert reply["code"] == 4002, reply  # fedml.failures.POLICY_REFUSED_CODE
            assert f"refused by the site's policy ({rule})" in reply["reason"], reply
        assert watch.opened() == []  # no refused task opened a data file
        assert not (site / "state" / "privacy-ledger.json").exists()  # nothing spent
        for rule in rules:
            assert "task refused: train: site client-0: " in deployment.site_console()
            assert f"({rule})" in deployment.site_console()

        # an honest DP run within the budget trains; all three epsilons agree
        rows_a = deployment.honest_run("run-a", {**DP, "rounds": 2})
        assert watch.opened() != []  # the control: training does open the data
    assert [r["clients"]["aggregated"] for r in rows_a] == [1, 1], rows_a
    server_epsilon = rows_a[-1]["privacy"]["epsilon_max"]
    ledger = SiteLedger.load(site / "state" / "privacy-ledger.json")
    (experiment,) = ledger.runs
    site_epsilon = epsilon_of(tuple(ledger.runs[experiment].history), "rdp", delta)
    assert server_epsilon == pytest.approx(site_epsilon, rel=1e-9)
    assert site_epsilon == pytest.approx(honest, rel=1e-9)  # Opacus, from first principles
    trail = audit.verify(site / "state")
    assert trail.ok
    trained = [e for e in trail.entries if e.get("message") == "train" and e["outcome"] == "done"]
    assert len(trained) == 2 and trained[-1]["privacy"]["epsilon_total"] == pytest.approx(honest)
    refused = [e for e in trail.entries if e.get("outcome") == "refused"]
    assert len(refused) == len(rules)
    assert all(f"({r})" in e["reason"] for e, r in zip(refused, rules, strict=True))
    address = f"127.0.0.1:{deployment.port}"  # each entry names the server (no TLS here)
    assert {(e["server"]["address"], e["server"]["certificate_sha256"]) for e in trail.entries} == {
        (address, "")
    }

    # a restart, then another experiment: its first round would cross the lifetime budget
    deployment.stop_site()
    before = (site / "state" / "privacy-ledger.json").read_bytes()
    deployment.start_superlink("run-b")
    deployment.start_site()
    rows_b = deployment.honest_run("run-b", {**DP, "rounds": 1, "seed": 1})
    assert rows_b[0]["clients"]["aggregated"] == 0, rows_b
    reasons = " ".join(rows_b[0]["failed_reasons"])
    assert "refused by the site's policy (privacy.max_epsilon_total)" in reasons
    assert (site / "state" / "privacy-ledger.json").read_bytes() == before  # nothing spent
    assert "(privacy.max_epsilon_total)" in deployment.site_console()
    server_trail = audit.verify(deployment.server / "run-b")
    assert server_trail.ok
    failures = [e for e in server_trail.entries if e["event"] == "failures"]
    assert failures and "privacy.max_epsilon_total" in " ".join(failures[0]["reasons"])
    assert not (deployment.server / "client-0.npz").exists()  # the data stayed at the site
