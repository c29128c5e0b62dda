"""How a node's state and identity travel in messages: the convention that the Ray
engine's grid (`simulations.virtual_nodes.SimulatedNodesGrid`) and the ClientApp
(`clients.app`) share, and that a deployed site refuses (`fedml.deploy.app_check`).

A message that carries its node's `Context.state` holds the empty record `STATE_MARKER`
and one record per state record, named `STATE_PREFIX + name`. `carry_node_state`, a
ClientApp mod, unpacks them into `Context.state` before the app runs and packs the state
the app leaves into the reply. A simulated node says which client it is by replying to a
query with the metric `PARTITION_KEY`.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

STATE_MARKER = "fedml.node-state"  # present: this message carries its node's state
STATE_PREFIX = "fedml.node-state/"  # + the name of a record in Context.state
PARTITION_KEY = "partition-id"  # the query reply's metric naming the node's client
PARTITIONS_KEY = "num-partitions"  # a simulated node's node config: how many there are
SITE_NAME_KEY = "site-name"  # a data site's node config: its name (its key's name)
TEST_DATA_KEY = "test-data-path"  # a data site's node config: its own test rows, prepared
SITE_STATE_KEY = "state-dir"  # a data site's node config: its state folder (kept state)


def take_state(content: RecordDict) -> RecordDict:
    """Remove the carried state (and its marker) from `content`; return the state."""
    state = RecordDict()
    for key in [k for k in content if k.startswith(STATE_PREFIX)]:
        state[key[len(STATE_PREFIX) :]] = content.pop(key)
    content.pop(STATE_MARKER, None)
    return state


def carry_node_state(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: a message that carries its node's state (from `SimulatedNodesGrid`)
    sets `context.state` before the app runs, and its reply carries the state back. Any
    other message passes through untouched."""
    if STATE_MARKER not in message.content:
        return call_next(message, context)
    context.state = take_state(message.content)
    reply = call_next(message, context)
    if not reply.has_error():
        reply.content[STATE_MARKER] = ConfigRecord()
        for name, record in context.state.items():
            reply.content[STATE_PREFIX + name] = record
    return reply
