"""A data site's executor: the one process that starts app code at a site.

`fedml client` runs `flower-supernode --isolation process`: the SuperNode pulls messages
from the SuperLink and queues them as tasks on its local Runtime API (127.0.0.1), but
starts nothing itself. This executor takes each ClientApp task and starts
`python -m fedml.deploy.site_task` for it, in a fresh process (Flower's isolation: one
process per message), which checks the run's app and runs only fedml's installed
ClientApp (see fedml.deploy.site_task). It replaces Flower's `flower-superexec`, which
would start `flwr-clientapp`, which would run whatever app the run carries.

Run as `python -m fedml.deploy.site_executor --runtime-api-address 127.0.0.1:PORT`;
it ends with its parent (`--parent-pid`, the `fedml client` that started it).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time

POLL_SECONDS = 0.2  # how often to ask the SuperNode for a task (Flower's default: 1 s)

log = logging.getLogger("fedml.site")


def serve(runtime_api_address: str, parent_pid: int | None) -> None:
    """Start one site task per ClientApp task the SuperNode queues, until stopped."""
    from fedml.deploy import flower_runtime as runtime

    if parent_pid is not None:
        runtime.exit_with_parent(parent_pid)
    client = runtime.connect(runtime_api_address)
    tasks: list[subprocess.Popen] = []
    while True:
        token = runtime.acquire_clientapp_task(client)
        if token is not None:
            command = [
                sys.executable, "-m", "fedml.deploy.site_task",
                "--runtime-api-address", runtime_api_address,
                "--token", token,
                "--parent-pid", str(os.getpid()),
            ]  # fmt: skip
            tasks.append(subprocess.Popen(command, stdin=subprocess.DEVNULL))
        tasks = [task for task in tasks if task.poll() is None]  # reap the finished
        if token is None:
            time.sleep(POLL_SECONDS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fedml's executor at a data site.")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll
    serve(args.runtime_api_address, args.parent_pid)


if __name__ == "__main__":
    main()
