"""A data site's executor: the one process that starts app code at a site.

`fedml client` runs `flower-supernode --isolation process`: the SuperNode pulls messages
from the SuperLink and queues them as tasks on its local Runtime API (127.0.0.1), but
starts nothing itself. This executor takes each ClientApp task and runs it in a fresh
process of its own (Flower's isolation: one process per message), which checks the run's
app and runs only fedml's installed ClientApp (see fedml.deploy.site_task). It replaces
Flower's `flower-superexec`, which would start `flwr-clientapp`, which would run
whatever app the run carries.

Each task's process is forked from this one, which has already imported what every task
imports (PyTorch, `torch._dynamo`, Flower, fedml's ClientApp: 2-3 s per process
otherwise). The fork is a copy: whatever a task changes (module state, the model, the
privacy ledger in memory) ends with it, and the next task starts again from the warm,
untouched state. Before forking, this process runs no tensor operation (so PyTorch's
thread pool is not started; NumPy's BLAS threads, which survive a fork, are the only
others), opens no device and reads no site data (each task memory-maps the prepared
data). A task is a copy of the executor and so could use its SuperExec secret; it runs
only fedml's installed ClientApp, and the secret file is the site user's anyway.

Run as `python -m fedml.deploy.site_executor --runtime-api-address 127.0.0.1:PORT
--secret-file F`; `fedml client` starts it with Linux's parent-death signal, so it ends
with `fedml client` (`--parent-pid` adds a watch on another process). The secret (the
SuperNode's `--superexec-auth-secret-file`) proves to the SuperNode that this process
may take tasks; a task's token stays in memory, never on a command line other users
could read.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from fedml.deploy import flower_runtime as runtime
from fedml.deploy.processes import die_with_parent
from fedml.deploy.site_task import run_task

POLL_SECONDS = 0.2  # how often to ask the SuperNode for a task (Flower's default: 1 s)
MAX_TASKS = 4  # tasks running at once; more wait queued at the SuperNode
RETRY_SECONDS = 2.0  # after a failed call to the SuperNode (it may be restarting)

log = logging.getLogger("fedml.site")


def warm_up() -> None:
    """Import, once, what every task imports, so that a forked task starts ready. Only
    imports: no tensor operation (it would start PyTorch's thread pool), no device."""
    import torch._dynamo  # noqa: F401  (an optimizer's first step imports it: 1.3-1.9 s)

    import clients.app  # noqa: F401  (PyTorch, Flower, fedml's ClientApp)


def serve(runtime_api_address: str, secret: bytes, parent_pid: int | None) -> None:
    """Fork one site task per ClientApp task the SuperNode queues, until stopped (or
    `parent_pid` is gone). A failed call (the SuperNode restarting, say) is logged and
    retried, never fatal."""
    if parent_pid is not None:
        runtime.exit_with_parent(parent_pid)  # a watch thread: forks do not inherit it
    warm_up()
    client = runtime.connect(runtime_api_address, secret=secret)
    running: set[int] = set()
    while True:
        running = {pid for pid in running if not _finished(pid)}
        if len(running) >= MAX_TASKS:
            time.sleep(POLL_SECONDS)
            continue
        try:
            token = runtime.acquire_clientapp_task(client)
            if token is not None:
                running.add(fork_task(runtime_api_address, token))
        except Exception:  # the site must keep serving: log, wait, try again
            log.exception("could not take or start a task; retrying")
            time.sleep(RETRY_SECONDS)
            continue
        if token is None:
            time.sleep(POLL_SECONDS)


def fork_task(runtime_api_address: str, token: str) -> int:
    """Run one task in a forked copy of this process; its pid."""
    executor = os.getpid()
    pid = os.fork()
    if pid == 0:  # the task: whatever happens, it ends here and never returns
        code = 1
        try:
            die_with_parent()  # Linux: SIGKILLed with the executor (site_task watches too)
            code = run_task(runtime_api_address, token, executor)
        except BaseException:
            log.exception("the task failed to run")
        finally:
            try:
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
            except BaseException:  # a full disk, say: still end here
                pass
            os._exit(code)
    return pid


def _finished(pid: int) -> bool:
    """Reap task `pid` if it has ended."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done != 0


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
