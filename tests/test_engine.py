"""The in-process Grid and the Flower internals it relies on."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from simulations.flower_internals import claim_server_identity, set_message_id, set_source_node
from simulations.inprocess import InProcessGrid


def test_flower_internals_still_work():
    claim_server_identity(run_id=42)
    message = Message(RecordDict(), 3, MessageType.TRAIN)
    assert message.metadata.run_id == 42 and message.metadata.dst_node_id == 3
    set_message_id(message, "abc")
    assert message.metadata.message_id == "abc"
    reply = Message(RecordDict(), reply_to=message)
    set_source_node(reply, 7)
    assert reply.metadata.src_node_id == 7


def _counting_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg, context):
        state = context.state.config_records.get("counter", ConfigRecord({"n": 0}))
        state["n"] = int(state["n"]) + 1
        context.state["counter"] = state
        msg.content["config"]["scribble"] = "client edit"  # must not leak to others
        metrics = MetricRecord(
            {"n": state["n"], "partition": context.node_config["partition-id"], "num-examples": 1}
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def _broadcast(grid, nodes):
    content = RecordDict({"config": ConfigRecord({"lr": 0.1})})
    messages = [Message(content, n, MessageType.TRAIN) for n in nodes]
    return content, list(grid.send_and_receive(messages))


def test_context_state_persists_per_node_across_rounds():
    grid = InProcessGrid(_counting_app(), num_nodes=3, run_config={})
    assert list(grid.get_node_ids()) == [1, 2, 3]
    _broadcast(grid, [1, 2, 3])
    content, replies = _broadcast(grid, [1, 3])
    by_node = {r.metadata.src_node_id: r.content["metrics"] for r in replies}
    assert by_node[1]["n"] == 2 and by_node[3]["n"] == 2
    assert by_node[3]["partition"] == 2  # partition-id is 0-based
    assert "scribble" not in content["config"]
    assert all(r.metadata.reply_to_message_id for r in replies)


def test_a_raising_client_is_an_error_reply_not_a_crash():
    app = ClientApp()

    @app.train()
    def train(msg, context):
        if context.node_config["partition-id"] == 1:
            raise RuntimeError("disk full at site 1")
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    grid = InProcessGrid(app, num_nodes=3, run_config={})
    _, replies = _broadcast(grid, [1, 2, 3])
    errors = [r for r in replies if r.has_error()]
    assert len(replies) == 3 and len(errors) == 1
    assert errors[0].metadata.src_node_id == 2
    assert "disk full at site 1" in errors[0].error.reason
