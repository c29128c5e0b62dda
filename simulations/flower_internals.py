"""The Flower internals our engines need, wrapped in one place.

Flower 1.42 offers no public way to (1) create a `Message` outside a running SuperLink
or simulation (the constructor reads `TaskIdentity`), (2) give a message the ID a
SuperLink would assign, or (3) change the node a reply says it came from (the Ray
engine's `SimulatedNodesGrid` renumbers nodes). A Flower upgrade that changes any of them
breaks `tests/test_engine.py::test_flower_internals_still_work`, not the product silently.
"""

from __future__ import annotations

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity


def claim_server_identity(run_id: int) -> None:
    """Let this process create server-side Messages for `run_id`, as a ServerApp would."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def set_message_id(message: Message, message_id: str) -> None:
    """Stamp the ID that a SuperLink assigns when it stores a message."""
    message.metadata.__dict__["_message_id"] = message_id


def set_source_node(message: Message, node_id: int) -> None:
    """Restamp the node a reply came from (Flower's `Metadata` has no setter for it)."""
    message.metadata.__dict__["_src_node_id"] = node_id
