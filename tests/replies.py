"""Real Flower reply Messages for tests that screen or gather replies."""

from __future__ import annotations

from flwr.app import Message, MessageType, RecordDict

from simulations.inprocess import InProcessGrid


def replies_from(contents: list[RecordDict | Exception]) -> list[Message]:
    """Node i answers with contents[i-1] (an Exception raises), through the in-process
    grid, so each reply carries real metadata (source node, reply-to)."""

    def client(msg: Message, context) -> Message:
        content = contents[msg.metadata.dst_node_id - 1]
        if isinstance(content, Exception):
            raise content
        return Message(content=content, reply_to=msg)

    grid = InProcessGrid(client, num_nodes=len(contents), run_config={})
    requests = [
        Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN)
        for n in range(1, len(contents) + 1)
    ]
    return list(grid.send_and_receive(requests))
