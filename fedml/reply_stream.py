"""Replies as they arrive: the deployed ServerApp's Grid, polled for latency.

Flower's deployment Grid (`HttpGrid`, what a ServerApp started by a SuperLink gets)
answers `send_and_receive` only when every reply is in or the timeout passes, and it
sleeps 3 s between pulls: each phase of a round waits up to 3 s after the last site
replied, and the round loop sees no reply before the slowest one. `PollingGrid` pushes
the same messages through Flower's public `push_messages` and pulls every
`interval` seconds, yielding each reply as soon as the SuperLink holds it (the round
loop screens and folds replies one at a time: see fedml.validation). Everything else
is the wrapped Grid's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run

POLL_SECONDS = 0.1  # one small HTTP request to the SuperLink on loopback per poll


class PollingGrid(Grid):
    """`grid`, with `send_and_receive` streaming replies and polling every `interval` s."""

    def __init__(self, grid: Grid, interval: float = POLL_SECONDS) -> None:
        self.inner = grid
        self.interval = interval

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Push `messages`, then yield each reply once it arrives, until all have
        replied or `timeout` seconds have passed (None: wait for all), as Flower's
        `send_and_receive` does, without its 3 s pauses."""
        pushed = list(self.inner.push_messages(messages))
        del messages  # the phase's outgoing models need not live while replies come
        waiting = {message_id for message_id in pushed if message_id}  # none: not pushed
        deadline = None if timeout is None else time.monotonic() + timeout
        while waiting:
            last = deadline is not None and time.monotonic() >= deadline
            for reply in self.inner.pull_messages(list(waiting)):
                if reply.metadata.reply_to_message_id in waiting:  # each reply once
                    waiting.discard(reply.metadata.reply_to_message_id)
                    yield reply
            if last:  # this pull came after the deadline: what arrived in time is in
                return
            if waiting:
                time.sleep(self.interval)
