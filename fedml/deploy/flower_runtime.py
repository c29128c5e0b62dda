"""The Flower internals a data site's executor and tasks use: the SuperNode's local
Runtime API client and the helpers `flwr-clientapp` itself uses to pull a task's input
and push its reply. Flower has no public API for running a task outside
`flwr-clientapp`, so they are wrapped here, in one place, and pinned by
tests/test_site.py: a Flower upgrade that moves them breaks that test, not a site.
"""

from __future__ import annotations

import os
import threading
import time

from flwr.app import Context, Message
from flwr.common.constant import SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime import run_clientapp as _clientapp

from fedml.deploy.processes import pid_alive

COMPLETED, FAILED = SubStatus.COMPLETED, SubStatus.FAILED


ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"


def connect(
    address: str, token: str | None = None, secret: bytes | None = None
) -> RuntimeHttpClient:
    """A client of the SuperNode's Runtime API on this machine (plain HTTP on
    loopback, as Flower's own executor uses it), as a task (`token`) or as the executor
    (`secret`: the SuperExec secret that the SuperNode demands before it hands out a
    task, so no other local process can take the site's tasks)."""
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    if secret is not None:
        interceptors.append(
            SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_TASK})
        )
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


def acquire_clientapp_task(client: RuntimeHttpClient) -> str | None:
    """The token of the next ClientApp task waiting at the SuperNode, or None."""
    response = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    return response.token if response.HasField("task") and response.token else None


def start_heartbeat(client: RuntimeHttpClient) -> HeartbeatSender:
    """Tell the SuperNode, while the task runs, that it is alive."""
    sender = HeartbeatSender(make_task_heartbeat_fn_http(client))
    sender.start()
    return sender


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """The task's message, context, run and app bundle (nothing is installed)."""
    return _clientapp.pull_task_input(client)


def push_reply(client: RuntimeHttpClient, reply: Message, context: Context) -> None:
    _clientapp.push_message(client, reply, context)


def push_task_output(
    client: RuntimeHttpClient, context: Context | None, status: str, details: str
) -> None:
    _clientapp.push_task_output(client, context, status, details)


def exit_with_parent(pid: int, interval: float = 0.2) -> None:
    """End this process at once when `pid` (the site executor) is gone. Flower's own
    monitor raises SIGINT instead, and a task would then try to report to a SuperNode
    that is gone too, retrying for ever; nothing a task holds needs more than an exit
    (the privacy ledger is written atomically)."""

    def watch() -> None:
        while pid_alive(pid):
            time.sleep(interval)
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
