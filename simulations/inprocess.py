"""The in-process engine: a Flower `Grid` that runs a ClientApp inside this process.

No Ray, no SuperLink, no polling: `send_and_receive` calls the ClientApp once per message
and yields each reply as it is made. Each virtual node keeps one Flower `Context` for the whole run
(node config `partition-id`/`num-partitions`, like Flower's Simulation Runtime), so
per-client state in `context.state` survives across rounds, and across a resume: the
run store commits `node_states()` each round and `load_node_states` puts it back. A
ClientApp that raises produces an error reply, exactly as a failing SuperNode would.
"""

from __future__ import annotations

import itertools
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from logging import getLogger

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedml.node_state import PARTITION_KEY, PARTITIONS_KEY
from simulations.flower_internals import claim_server_identity, set_message_id

log = getLogger(__name__)

ClientAppCallable = Callable[[Message, Context], Message]


class InProcessGrid(Grid):
    """A Grid whose nodes are virtual clients served by `client_app` in this process."""

    def __init__(
        self,
        client_app: ClientAppCallable,
        num_nodes: int,
        run_config: dict,
        run_id: int = 1,
    ) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self._counter = itertools.count()
        # Node IDs are 1..N so logs and tests can name them; partition-id is 0-based.
        self.contexts: dict[int, Context] = {
            node_id: Context(
                run_id=run_id,
                node_id=node_id,
                node_config={PARTITION_KEY: node_id - 1, PARTITIONS_KEY: num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for node_id in range(1, num_nodes + 1)
        }
        self._outbox: dict[str, Message] = {}
        claim_server_identity(run_id)

    # -- Grid interface ---------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            if message.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"no node with ID {message.metadata.dst_node_id}")
            message_id = f"m{next(self._counter)}"
            set_message_id(message, message_id)
            self._outbox[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._deliver(self._outbox.pop(mid)) for mid in message_ids if mid in self._outbox]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Deliver the messages one by one, yielding each reply as it is made, so the
        caller can fold it in and let it go (memory O(one reply), not O(all replies)).

        With a `timeout` (seconds from this call), a reply finished after the deadline is
        dropped and messages not yet delivered by then are never delivered, as a real
        Grid returns only the replies that arrived in time. A call in progress is not
        interrupted (it runs in this thread).
        """
        message_ids = self.push_messages(messages)
        deadline = None if timeout is None else time.monotonic() + timeout
        for message_id in message_ids:
            message = self._outbox.pop(message_id)
            if deadline is not None and time.monotonic() >= deadline:
                continue
            reply = self._deliver(message)
            if deadline is None or time.monotonic() <= deadline:
                yield reply

    # -- per-node state (the run store commits it) -----------------------------------
    def node_states(self) -> dict[int, RecordDict]:
        """Each node's `Context.state` that holds anything."""
        return {node: ctx.state for node, ctx in self.contexts.items() if len(ctx.state) > 0}

    def load_node_states(self, states: dict[int, RecordDict]) -> None:
        """Put committed per-node state back (nodes not named start empty)."""
        for node, ctx in self.contexts.items():
            ctx.state = states.get(node, RecordDict())

    # -- delivery -----------------------------------------------------------------------
    def _deliver(self, message: Message) -> Message:
        """Run the ClientApp on a private copy of the message, as a remote node would
        receive its own deserialised copy."""
        node_id = message.metadata.dst_node_id
        delivered = Message(content=_copy(message.content), metadata=message.metadata)
        try:
            reply = self.client_app(delivered, self.contexts[node_id])
        except Exception as exc:  # a failing client is a failed reply, not a failed run
            log.debug("ClientApp failed on node %d:\n%s", node_id, traceback.format_exc())
            reason = f"{type(exc).__name__}: {exc}"
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=delivered
            )
        set_message_id(reply, f"r{next(self._counter)}")
        return reply


def _copy(content: RecordDict) -> RecordDict:
    """Copy the records (not the immutable Array payloads) so a client that edits its
    message cannot change what other clients receive."""
    copied = RecordDict()
    for key, record in content.items():
        fresh = type(record)()
        for name, value in record.items():
            fresh[name] = value.copy() if isinstance(value, list) else value
        copied[key] = fresh
    return copied
