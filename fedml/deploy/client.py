"""`fedml client`: a Flower SuperNode at a data site, training on the site's own data.

Before it starts the SuperNode it checks, each with one clear error, its own things
first and the network last:
- the site's PKI folder (`ca.crt`, `node.key` from `fedml certs add-node`);
- its policy file (`--policy`), strictly;
- that the SuperNode's local port is free on this machine;
- the data (`--data`: .npz, a folder of them, or a CSV with a label column), which it
  prepares once as memory-mapped arrays in the site's state folder (`fedml.data.site`);
- the requested device;
- that the SuperLink answers at HOST:PORT, and that it speaks what the site expects:
  TLS with a certificate the site's `ca.crt` vouches for, or (with `--insecure`) no TLS.
Then it runs `flower-supernode --isolation process` (telemetry off, no runtime installs)
until it exits or is stopped, with the node config our ClientApp reads: `data-path`
(the prepared data) and `data-rows`, `privacy-ledger` (the site's DP ledger file),
`device`, `allowed-models` and `policy` (`--policy`: the site's policy file, checked
here first, judged by the executor for every task before any data is read; a policy
that pins the server's certificate is checked at every connection). Beside it runs
fedml's site executor (fedml.deploy.site_executor), the only thing that starts app
code here: it runs fedml's installed ClientApp and refuses any other app a run carries
(fedml.deploy.app_check), even from a compromised server. A SuperLink that refuses
the site's key ends it with an error saying so. What leaves the site: model updates
and metrics, never examples.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from fedml.data.site import prepare_site
from fedml.deploy.app_check import ALLOWED_MODELS_KEY
from fedml.deploy.policy_check import POLICY_KEY, ROWS_KEY
from fedml.deploy.processes import (
    Child,
    bind_error,
    flower_command,
    flower_env,
    port_open,
    split_address,
)
from fedml.deploy.site_audit import SERVER_CERTIFICATE_KEY, SERVER_KEY
from fedml.deploy.site_state import (
    TASK_DONE_MARK,
    TASK_FAILED_MARK,
    TASK_REFUSED_MARK,
    claim,
    default_state_dir,
    key_fingerprint,
    site_name,
)
from fedml.errors import FedmlError
from fedml.node_state import SITE_NAME_KEY, SITE_STATE_KEY, TEST_DATA_KEY
from fedml.pki import site_files
from fedml.site_policy import SitePolicy, load_policy

DATA_FOLDER = "data"
TEST_FOLDER = "test-data"  # in the state folder: --test-data, prepared
LEDGER_FILE = "privacy-ledger.json"
LOCAL_HOST = "127.0.0.1"  # the SuperNode's Runtime API: this machine only
EXECUTOR_LOG = "executor.log"  # in the state folder: every task's log lines
SECRET_FILE = "executor.secret"  # in the state folder: the SuperExec secret
REFUSED_MARK = "Failed to activate SuperNode"  # Flower's log line when auth fails
# Flower's SuperNode logs this when it stops retrying a call (after a TLS handshake
# timeout, say) and then stays up, connected to nothing: the site restarts it.
GAVE_UP_MARK = "Giving up reconnection"
QUICK_EXIT, MAX_QUICK_EXITS = 15.0, 5  # seconds; exits that short in a row: give up


@dataclass(frozen=True)
class ClientOptions:
    """How to run a site's SuperNode."""

    superlink: str  # HOST:PORT of the SuperLink
    data: Path
    pki: Path | None  # the site's folder (PKI/sites/NAME); None only when insecure
    insecure: bool = False
    device: str = ""  # "" keeps the run config's client.device
    state_dir: Path | None = None  # None: derived from the site (site_state.default_state_dir)
    label_column: str = "label"
    port: int = 9094  # the SuperNode's local Runtime API port (one per node on a machine)
    join_timeout: float = 60.0  # seconds to wait for the SuperLink, or while it refuses us
    allowed_models: tuple[str, ...] = ()  # module:factory models this site agrees to build
    test_data: Path | None = None  # the site's own test rows: evaluated on, never trained on
    policy: Path | None = None  # the site's policy file (fedml.site_policy)

    @property
    def name(self) -> str:
        """The site's name: its PKI folder's (sites/NAME), or its data file's."""
        return site_name(None if self.insecure else self.pki, self.data)

    @property
    def state(self) -> Path:
        """The site's state folder: `state_dir`, or the default derived from the site."""
        return self.state_dir or default_state_dir(self.name)


@dataclass(frozen=True)
class Prepared:
    """A site ready to start: its SuperNode's command line, and the SHA-256 of the TLS
    certificate its SuperLink presented ("" with --insecure)."""

    command: list[str]
    certificate: str


def prepare(options: ClientOptions, say: Callable[[str], None]) -> Prepared:
    """Every check, and the data prepared."""
    host, port = split_address(options.superlink)
    security = _security_options(options)
    policy = _read_policy(options, say)
    _check_local_port(options.port)
    folder, shard = prepare_site(options.data, options.state / DATA_FOLDER, options.label_column)
    classes = sorted({int(c) for c in shard.y})
    say(
        f"site data: {len(shard)} examples of {tuple(shard.x.shape[1:])} features, "
        f"labels {classes[0]}..{classes[-1]} (prepared in {folder})"
    )
    test_folder = _prepare_test_data(options, shard.x.shape[1:], say)
    if options.device:
        from clients.trainer import resolve_device  # torch: only when a device is asked for

        say(f"device: {resolve_device(options.device)}")
    node_config = {
        "data-path": str(folder.resolve()),
        "privacy-ledger": str((options.state / LEDGER_FILE).resolve()),
        SITE_NAME_KEY: options.name,
        SITE_STATE_KEY: str(options.state.resolve()),
        ROWS_KEY: len(shard),
    }
    if options.policy is not None:
        node_config[POLICY_KEY] = str(options.policy.resolve())
    if options.device:
        node_config["device"] = options.device
    if test_folder is not None:
        node_config[TEST_DATA_KEY] = str(test_folder.resolve())
    if options.allowed_models:
        node_config[ALLOWED_MODELS_KEY] = ",".join(options.allowed_models)
    _wait_for_superlink(host, port, options.join_timeout, say)
    certificate = _check_server(options, host, port, policy)
    node_config[SERVER_KEY] = options.superlink  # the site's audit trail names its server
    if certificate:
        node_config[SERVER_CERTIFICATE_KEY] = certificate
    command = [
        *flower_command("flower-supernode"),
        "--superlink", options.superlink,
        "--host", LOCAL_HOST,
        "--port", str(options.port),
        "--isolation", "process",  # app code is started by fedml's site executor only
        "--node-config", " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items()),
    ]  # fmt: skip
    return Prepared([*command, *security], certificate)


def _read_policy(options: ClientOptions, say: Callable[[str], None]) -> SitePolicy | None:
    """The site's policy, checked (None without `--policy`); its rules are printed."""
    if options.policy is None:
        return None
    policy = load_policy(options.policy)
    if policy.server.certificate_sha256 and options.insecure:
        raise FedmlError(
            f"{options.policy} pins the server's certificate (server.certificate_sha256), "
            "but this site was started with --insecure (no TLS, no certificate). Use --pki."
        )
    say(f"site policy {options.policy} (judged before any task reads data):")
    for line in policy.summary():
        say(f"  {line}")
    if policy.privacy.max_epsilon_per_run and not policy.privacy.max_epsilon_total:
        say(
            "  warning: privacy.max_epsilon_per_run bounds each experiment, and a server can "
            "start another one; set privacy.max_epsilon_total for a limit over all of them"
        )
    return policy


def _check_server(options: ClientOptions, host: str, port: int, policy: SitePolicy | None) -> str:
    """The SuperLink speaks what the site expects: TLS with a certificate the site's CA
    vouches for (and, when the policy pins one, that very certificate), or plain HTTP
    with --insecure. Returns the certificate's SHA-256 ("" with --insecure)."""
    if options.insecure:
        _check_plain(host, port)
        return ""
    assert options.pki is not None
    served = hashlib.sha256(_check_certificate(host, port, options.pki / "ca.crt")).hexdigest()
    pinned = policy.server.certificate_sha256 if policy is not None else None
    if pinned and served != pinned:
        raise FedmlError(
            f"The SuperLink at {host}:{port} presented a certificate of SHA-256 {served}, "
            f"but this site's policy ({options.policy}) pins {pinned} "
            "(server.certificate_sha256). This site does not join: ask the server's "
            "operator whether the certificate was renewed."
        )
    return served


def _prepare_test_data(
    options: ClientOptions, features: tuple[int, ...], say: Callable[[str], None]
) -> Path | None:
    """The site's test rows, prepared like its data (None without `--test-data`); they
    must have the training data's features."""
    if options.test_data is None:
        return None
    folder, shard = prepare_site(
        options.test_data, options.state / TEST_FOLDER, options.label_column
    )
    if shard.x.shape[1:] != features:
        raise FedmlError(
            f"--test-data {options.test_data} has examples of shape {shard.x.shape[1:]}, "
            f"--data {options.data} of shape {features}: the test rows need the same columns."
        )
    say(
        f"site test data: {len(shard)} examples, never trained on; each evaluation sends "
        "only the global model's metrics on them"
    )
    return folder


def _security_options(options: ClientOptions) -> list[str]:
    """The SuperNode's TLS and authentication options, from the site's PKI folder
    (checked here, before anything else: a site's own files come first)."""
    if options.insecure:
        return ["--insecure"]
    if options.pki is None:
        raise FedmlError(
            "fedml client needs --pki SITE_DIR (the sites/NAME folder from `fedml certs "
            "add-node`), or --insecure for a local experiment."
        )
    files = site_files(options.pki)
    return [
        "--root-certificates", str(files.ca_cert.resolve()),
        "--auth-supernode-private-key", str(files.node_key.resolve()),
    ]  # fmt: skip


def _check_local_port(port: int) -> None:
    """The SuperNode's local Runtime API port must be free on this machine."""
    error = bind_error(LOCAL_HOST, port)
    if error is not None:
        raise FedmlError(
            f"Port {port} on this machine is in use ({error.strerror or error}); another "
            "fedml client (or SuperNode) may be running here. Give each site on one "
            "machine its own --port."
        )


def _wait_for_superlink(host: str, port: int, timeout: float, say: Callable[[str], None]) -> None:
    """Until the SuperLink accepts connections (the server may still be starting)."""
    deadline = time.monotonic() + timeout
    if port_open(host, port, timeout=5):
        return
    bound = f" up to {timeout:.0f} s" if math.isfinite(timeout) else ""
    say(f"waiting{bound} for the SuperLink at {host}:{port}")
    while time.monotonic() < deadline:
        time.sleep(1.0)
        if port_open(host, port, timeout=5):
            return
    raise FedmlError(
        f"Cannot reach the SuperLink at {host}:{port}: nothing answered for {timeout:.0f} s. "
        "Check the address, that `fedml server` is running, and the firewall between."
    )


def _check_certificate(host: str, port: int, ca_cert: Path) -> bytes:
    """A TLS handshake with the SuperLink, verified against the site's CA certificate;
    the certificate it presented (DER)."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with (
            socket.create_connection((host, port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            served = tls.getpeercert(binary_form=True)
            assert served is not None  # a verified handshake always has one
            return served
    except ssl.SSLCertVerificationError as exc:
        raise FedmlError(
            f"The SuperLink at {host}:{port} presented a certificate that {ca_cert} does not "
            f"vouch for ({exc.verify_message}). Get the current ca.crt from the server's "
            "operator, and make sure the certificate names this host (fedml certs init --host)."
        ) from exc
    except ssl.SSLError as exc:
        raise FedmlError(
            f"TLS with the SuperLink at {host}:{port} failed ({exc.reason}). Is it running "
            "without TLS (--insecure)? Then this site must use --insecure too."
        ) from exc
    except OSError as exc:
        raise FedmlError(f"Cannot reach the SuperLink at {host}:{port}: {exc}.") from exc


def _check_plain(host: str, port: int) -> None:
    """With --insecure: the SuperLink must not expect TLS (a site speaking plain HTTP to a
    TLS server would retry forever)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            pass
    except (ssl.SSLError, OSError):
        return  # no TLS handshake: a plain HTTP server, as expected
    raise FedmlError(
        f"The SuperLink at {host}:{port} speaks TLS, but this site was started with "
        "--insecure. Use --pki SITE_DIR (the sites/NAME folder from the server's operator) "
        "instead."
    )


def run_site(options: ClientOptions, say: Callable[[str], None]) -> None:
    """Check everything, then keep the site's SuperNode running until we are stopped.

    A SuperNode ends when its SuperLink goes away for good or restarts (a restarted
    SuperLink no longer knows the node); the site then waits for the SuperLink and
    starts a new SuperNode, so `fedml server --resume` finds its sites again. A key the
    SuperLink refuses is retried for `options.join_timeout` seconds (the server
    registers its sites just after it starts), then it is an error; so is a SuperNode
    that keeps failing right after it starts."""
    host, port = split_address(options.superlink)
    _security_options(options)  # the site's own files first: its key names its folder
    fingerprint = key_fingerprint(None if options.insecure else options.pki)
    with claim(options.state, fingerprint, options.data):
        prepared = prepare(options, say)
        _serve(options, host, port, prepared, _read_policy(options, lambda _: None), say)


def _serve(
    options: ClientOptions,
    host: str,
    port: int,
    prepared: Prepared,
    policy: SitePolicy | None,
    say: Callable[[str], None],
) -> None:
    """Run the SuperNode and the executor until stopped (see `run_site`)."""
    command = [
        *prepared.command,
        "--superexec-auth-secret-file",
        str(_write_secret(options.state).resolve()),
    ]
    log = options.state / "supernode.log"
    tasks = TaskReport(options.state / EXECUTOR_LOG, say)
    refused_since: float | None = None
    quick_exits = 0
    while True:
        offset = log.stat().st_size if log.exists() else 0  # this attempt's lines only
        started = time.monotonic()
        supernode = Child("SuperNode", command, log, flower_env())
        executor = _start_executor(options)
        say(f"SuperNode started (log: {log}); Ctrl-C stops it")
        try:
            refused, gave_up, ended = _run_until_exit(supernode, executor, offset, tasks)
        finally:
            executor.stop()
        if refused:
            refused_since = refused_since or started
            if time.monotonic() - refused_since >= options.join_timeout:
                raise FedmlError(
                    f"The SuperLink at {options.superlink} refused this site's key (for "
                    f"{options.join_timeout:.0f} s). Ask its operator to add the site (fedml "
                    "certs add-node NAME) and restart fedml server, then use the sites/NAME "
                    "folder it made as --pki."
                )
            say("the SuperLink refused this site's key (not registered yet?); retrying in 5 s")
            time.sleep(5)
            continue
        refused_since = None
        quick = time.monotonic() - started < QUICK_EXIT and not gave_up  # gave up: it ran
        quick_exits = quick_exits + 1 if quick else 0
        if quick_exits >= MAX_QUICK_EXITS:
            raise FedmlError(
                f"The {ended.name} keeps exiting right after it starts (code "
                f"{ended.process.returncode}). Its log ({ended.log}) ends with:\n"
                f"{ended.tail()}"
            )
        if gave_up:
            say(f"the SuperNode gave up reaching the SuperLink (see {log}); reconnecting")
        else:
            say("the SuperNode stopped (the SuperLink went away or restarted); reconnecting")
        _wait_for_superlink(host, port, math.inf, say)
        certificate = _check_server(options, host, port, policy)  # pinned or vouched for
        if certificate != prepared.certificate:
            raise FedmlError(
                f"The SuperLink at {options.superlink} now presents another certificate "
                f"(SHA-256 {certificate}, was {prepared.certificate}). This site's audit "
                "trail names its server by that certificate: restart fedml client to "
                "accept the new one (or pin it: server.certificate_sha256 in --policy)."
            )
        time.sleep(2)


def _start_executor(options: ClientOptions) -> Child:
    """fedml's site executor for this SuperNode (its log: STATE_DIR/executor.log)."""
    command = [
        sys.executable, "-m", "fedml.deploy.site_executor",
        "--runtime-api-address", f"{LOCAL_HOST}:{options.port}",
        "--secret-file", str(_secret_file(options.state).resolve()),
    ]  # fmt: skip
    return Child("site executor", command, options.state / EXECUTOR_LOG, flower_env())


def _secret_file(state_dir: Path) -> Path:
    """The SuperExec secret the SuperNode and the executor share (made once per site
    run, 0600 from its first byte): only the executor may take the site's tasks."""
    return state_dir / SECRET_FILE


def _write_secret(state_dir: Path) -> Path:
    path = _secret_file(state_dir)
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(secrets.token_bytes(32))
    return path


def _run_until_exit(
    supernode: Child, executor: Child, start: int, tasks: TaskReport
) -> tuple[bool, bool, Child]:
    """Wait for the SuperNode or its executor to exit, or for the SuperNode to give up
    reaching the SuperLink (it stays up then, connected to nothing), stopping the
    SuperNode on the way out. Returns whether the SuperLink refused its key and whether
    it gave up (the SuperNode's log after byte `start` says so), and which process
    ended. Meanwhile the executor's task outcomes go to `tasks`. Logs are read
    incrementally: a site runs for days."""
    supernode_log = NewLines(supernode.log, start)
    refused = gave_up = False
    ended = supernode
    try:
        while supernode.alive() and executor.alive() and not (refused or gave_up):
            time.sleep(0.5)
            tasks.read()
            lines = supernode_log.read()
            refused = any(REFUSED_MARK in line for line in lines)
            gave_up = any(GAVE_UP_MARK in line for line in lines)
        ended = executor if not executor.alive() else supernode
    finally:
        supernode.stop()
    tasks.read()
    # the SuperNode may have logged the refusal (or gave up) and exited between two looks
    last = supernode_log.read()
    refused = refused or any(REFUSED_MARK in line for line in last)
    gave_up = gave_up or any(GAVE_UP_MARK in line for line in last)
    return refused, gave_up, ended


class NewLines:
    """The complete lines a growing log gains after a byte offset, each read once."""

    def __init__(self, log: Path, offset: int) -> None:
        self.log, self.offset, self.partial = log, offset, b""

    def read(self) -> list[str]:
        try:
            with self.log.open("rb") as handle:
                handle.seek(self.offset)
                new = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(new)
        *lines, self.partial = (self.partial + new).split(b"\n")
        return [line.decode("utf-8", errors="replace") for line in lines]


class TaskReport:
    """What the site's console says of its tasks: each failure with its reason and
    where the details are, loudly when the site has failed every task in a row, and each
    task the site refused (its app check or its policy) with the reason."""

    LOUD_AFTER = 3  # failed tasks in a row

    def __init__(self, executor_log: Path, say: Callable[[str], None]) -> None:
        self.lines = NewLines(
            executor_log, executor_log.stat().st_size if executor_log.exists() else 0
        )
        self.executor_log, self.say, self.failed_in_a_row = executor_log, say, 0

    def read(self) -> None:
        for line in self.lines.read():
            if TASK_DONE_MARK in line:
                if self.failed_in_a_row >= self.LOUD_AFTER:
                    self.say(f"tasks succeed again after {self.failed_in_a_row} failures")
                self.failed_in_a_row = 0
            elif TASK_REFUSED_MARK in line:  # the site's own rules: not a fault
                reason = line.split(TASK_REFUSED_MARK, 1)[1]
                self.say(f"task refused: {escape(reason)}")
            elif TASK_FAILED_MARK in line:
                self.failed_in_a_row += 1
                reason = line.split(TASK_FAILED_MARK, 1)[1]
                self.say(f"task failed: {escape(reason)} (details: {self.executor_log})")
                if self.failed_in_a_row == self.LOUD_AFTER:
                    self.say(
                        f"THIS SITE HAS FAILED ITS LAST {self.failed_in_a_row} TASKS; the "
                        "server counts it as failed until the cause above is fixed"
                    )
