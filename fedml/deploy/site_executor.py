"""A data site's executor: the one process that starts app code at a site.

`fedml client` runs `flower-supernode --isolation process`: the SuperNode pulls messages
from the SuperLink and queues them as tasks on its local Runtime API (127.0.0.1), but
starts nothing itself. This executor takes each ClientApp task and starts
`python -m fedml.deploy.site_task` for it, in a fresh process (Flower's isolation: one
process per message), which checks the run's app and runs only fedml's installed
ClientApp (see fedml.deploy.site_task). It replaces Flower's `flower-superexec`, which
would start `flwr-clientapp`, which would run whatever app the run carries.

Run as `python -m fedml.deploy.site_executor --runtime-api-address 127.0.0.1:PORT
--secret-file F`; it ends with its parent (`--parent-pid`, the `fedml client` that
started it). The secret (the SuperNode's `--superexec-auth-secret-file`) proves to the
SuperNode that this process may take tasks; a task's token reaches its process on
standard input, never on a command line other users could read.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from fedml.deploy import flower_runtime as runtime
from fedml.deploy.processes import die_with_parent

POLL_SECONDS = 0.2  # how often to ask the SuperNode for a task (Flower's default: 1 s)
MAX_TASKS = 4  # tasks running at once; more wait queued at the SuperNode
RETRY_SECONDS = 2.0  # after a failed call to the SuperNode (it may be restarting)

log = logging.getLogger("fedml.site")


def serve(runtime_api_address: str, secret: bytes, parent_pid: int | None) -> None:
    """Start one site task per ClientApp task the SuperNode queues, until stopped. A
    failed call (the SuperNode restarting, say) is logged and retried, never fatal."""
    if parent_pid is not None:
        runtime.exit_with_parent(parent_pid)
    client = runtime.connect(runtime_api_address, secret=secret)
    running: list[subprocess.Popen] = []
    while True:
        running = [task for task in running if task.poll() is None]  # reap the finished
        if len(running) >= MAX_TASKS:
            time.sleep(POLL_SECONDS)
            continue
        try:
            token = runtime.acquire_clientapp_task(client)
            if token is not None:
                running.append(_start_task(runtime_api_address, token))
        except Exception:  # the site must keep serving: log, wait, try again
            log.exception("could not take or start a task; retrying")
            time.sleep(RETRY_SECONDS)
            continue
        if token is None:
            time.sleep(POLL_SECONDS)


def _start_task(runtime_api_address: str, token: str) -> subprocess.Popen:
    """`python -m fedml.deploy.site_task` for one task, its token on standard input."""
    command = [
        sys.executable, "-m", "fedml.deploy.site_task",
        "--runtime-api-address", runtime_api_address,
        "--parent-pid", str(os.getpid()),
    ]  # fmt: skip
    # the task dies with this executor (Linux), and watches it besides (site_task)
    task = subprocess.Popen(command, stdin=subprocess.PIPE, preexec_fn=die_with_parent)
    assert task.stdin is not None
    task.stdin.write(token.encode() + b"\n")
    task.stdin.close()
    return task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fedml's executor at a data site.")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--secret-file", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll
    serve(args.runtime_api_address, args.secret_file.read_bytes(), args.parent_pid)


if __name__ == "__main__":
    main()
