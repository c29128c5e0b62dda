"""Flower's simulated SuperNodes, seen by our round loop exactly as the in-process engine's.

Under Flower's Simulation Runtime every virtual node gets a random 64-bit node ID; only
its node config says which client it is (`partition-id`). Sampling by node ID would then
pick different clients than the in-process engine (whose node IDs are 1..N), and the
Runtime keeps each node's `Context.state` only in its own memory, so a resumed run would
lose it (a DP client's privacy ledger among it).

`SimulatedNodesGrid` wraps the Runtime's Grid so that, seen from the server:

- node IDs are `partition-id + 1`, as in `InProcessGrid`: the same seed samples the
  same clients, so both engines play the same rounds. The mapping is learned once, with
  one Flower query message per node, answered by the ClientApp's `identify` handler;
- each node's state travels with its messages: the grid adds the node's state records
  to every message it sends (the convention of `fedml.node_state`), and
  `carry_node_state`, a ClientApp mod, puts them into `Context.state` before the app runs
  and returns the state it leaves in the reply. The grid keeps the newest state per
  node; `node_states()` hands it to the run store each round and `load_node_states()`
  restores it on resume, exactly as with `InProcessGrid`.

Sending the state to the client is fine in simulation only: the server and every
client are one operator's processes. A real deployment never uses this grid.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedml.errors import FedmlError
from fedml.node_state import PARTITION_KEY, STATE_MARKER, STATE_PREFIX, take_state
from simulations.flower_internals import set_source_node


class SimulatedNodesGrid(Grid):
    """The Simulation Runtime's `grid`, with node IDs 1..N and node state carried."""

    def __init__(self, grid: Grid, num_nodes: int, wait: float = 120.0) -> None:
        self.inner = grid
        self.num_nodes = num_nodes
        self.wait = wait  # seconds to wait for the Runtime's nodes and their answers
        self.states: dict[int, RecordDict] = {}
        self._to_flower: dict[int, int] = {}  # our node ID -> the Runtime's
        self._from_flower: dict[int, int] = {}

    # -- Grid interface ---------------------------------------------------------------
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
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        self._learn_nodes()
        return list(self._to_flower)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._learn_nodes()
        return self.inner.push_messages([self._outgoing(m) for m in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._incoming(reply) for reply in self.inner.pull_messages(message_ids)]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        self._learn_nodes()
        outgoing = [self._outgoing(m) for m in messages]
        for reply in self.inner.send_and_receive(outgoing, timeout=timeout):
            yield self._incoming(reply)

    # -- per-node state (the run store commits it) -----------------------------------
    def node_states(self) -> dict[int, RecordDict]:
        """Each node's newest `Context.state` that holds anything."""
        return {node: state for node, state in self.states.items() if len(state) > 0}

    def load_node_states(self, states: dict[int, RecordDict]) -> None:
        """Put committed per-node state back (nodes not named start empty)."""
        self.states = dict(states)

    # -- translation ------------------------------------------------------------------
    def _outgoing(self, message: Message) -> Message:
        """A copy of `message` for the Runtime's node, carrying the node's state."""
        node = message.metadata.dst_node_id
        if node not in self._to_flower:
            raise ValueError(f"no node with ID {node}")
        content = RecordDict(dict(message.content.items()))
        content[STATE_MARKER] = ConfigRecord()
        for name, record in self.states.get(node, RecordDict()).items():
            content[STATE_PREFIX + name] = record
        return Message(
            content,
            self._to_flower[node],
            message.metadata.message_type,
            ttl=message.metadata.ttl,
            group_id=message.metadata.group_id,
        )

    def _incoming(self, reply: Message) -> Message:
        """The reply as from our node ID, with the state it carried taken out and kept."""
        node = self._from_flower[reply.metadata.src_node_id]
        set_source_node(reply, node)
        if not reply.has_error() and STATE_MARKER in reply.content:
            self.states[node] = take_state(reply.content)
        return reply

    def _learn_nodes(self) -> None:
        """Ask every simulated node which client it is (once)."""
        if self._to_flower:
            return
        deadline = time.monotonic() + self.wait
        flower_ids = list(self.inner.get_node_ids())
        while len(flower_ids) < self.num_nodes and time.monotonic() < deadline:
            time.sleep(0.5)
            flower_ids = list(self.inner.get_node_ids())
        queries = [
            Message(RecordDict(), node_id, MessageType.QUERY, group_id="identify")
            for node_id in flower_ids
        ]
        answers = {}
        for reply in self.inner.send_and_receive(queries, timeout=self.wait):
            metrics = reply.content.metric_records.get("metrics") if reply.has_content() else None
            if metrics is not None and PARTITION_KEY in metrics:
                answers[reply.metadata.src_node_id] = int(metrics[PARTITION_KEY]) + 1
        expected = set(range(1, self.num_nodes + 1))
        if set(answers.values()) != expected or len(answers) != self.num_nodes:
            raise FedmlError(
                f"The Simulation Runtime's {len(flower_ids)} node(s) did not identify as "
                f"clients 0..{self.num_nodes - 1} ({len(answers)} answered). Its ClientApp "
                "must be fedml's (clients.app:app), with num-supernodes equal to "
                "simulation.clients."
            )
        self._from_flower = answers
        self._to_flower = dict(sorted((node, flower) for flower, node in answers.items()))
