"""Secure aggregation's cost: one round's seconds and the bytes each site sends, with and
without it, next to Flower's own SecAgg+ (the anchor) on the same sites and model.

Workload: N sites (10, 50) and a model of P float32 parameters (100k, 1M); "training"
adds 0.01 to every parameter (the protocol is what is measured, not the training). Every
side runs on the same in-process grid (fedml's `InProcessGrid`), one process:

- plain: fedml's train messages and replies, the replies averaged (no protection);
- fedml secagg: fedml's `SecureRound` (the round loop's secure train phase) driving
  fedml's ClientApp handlers (clients/secagg.py): SecAgg+ with 4 neighbours, threshold 3;
- flower secagg+: Flower's `SecAggPlusWorkflow` + `secaggplus_mod` (its legacy workflow)
  with 5 shares (itself and 4 neighbours), threshold 3, on the same grid.

Bytes per site: the serialised size of every reply a site sends in the round (Flower's
protobuf encoding of the message content), averaged over the sites.

    python -m bench.secagg [--sites 10 50] [--params 100000 1000000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import secagg as site_side
from fedml.arrays import from_numpy, record_of, to_numpy
from fedml.config import load_config
from fedml.secagg import messages as wire
from fedml.secure_round import SecureRound
from fedml.statefile import recorddict_to_bytes
from fedml.validation import Tally
from simulations.inprocess import InProcessGrid
from strategies.aggregate import WeightedMean

NEIGHBOURS, THRESHOLD, EXAMPLES = 4, 3, 100


class CountingGrid(InProcessGrid):
    """The in-process grid, adding up the bytes of every reply; lists, not streams, as
    Flower's legacy workflow reads its replies twice."""

    reply_bytes = 0

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_content():
                self.reply_bytes += len(recorddict_to_bytes(reply.content))
        return replies


def _trained(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: to_numpy(a) + np.float32(0.01) for k, a in arrays.items()}


def fedml_app(secure: bool) -> ClientApp:
    """fedml's site side with the training replaced by +0.01."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = load_config(None, dict(context.run_config))
        trained = _trained(msg.content["arrays"])
        if secure:
            reference = {k: to_numpy(a) for k, a in msg.content["arrays"].items()}
            content = site_side.masked_update(
                msg, context, cfg, trained, reference, EXAMPLES, {"loss": 1.0},
                np.random.default_rng(context.node_id),
            )  # fmt: skip
        else:
            arrays = record_of({k: from_numpy(v) for k, v in trained.items()})
            metrics = MetricRecord({"loss": 1.0, "num-examples": EXAMPLES})
            content = RecordDict({"arrays": arrays, "metrics": metrics})
        return Message(content, reply_to=msg)

    @app.train(wire.KEYS_ACTION)
    def keys(msg: Message, context: Context) -> Message:
        cfg = load_config(None, dict(context.run_config))
        return site_side.advertise(msg, context, cfg, int(context.node_config["partition-id"]))

    app.train(wire.SHARE_ACTION)(site_side.share)
    app.train(wire.UNMASK_ACTION)(site_side.unmask)
    return app


def fedml_round(sites: int, params: int, secure: bool) -> tuple[float, float]:
    """(seconds, bytes per site) of one fedml round, plain or secure."""
    overrides = {"simulation.clients": sites, "secagg.neighbours": NEIGHBOURS}
    cfg = load_config(None, {**overrides, "secagg.threshold": THRESHOLD, "secagg.enabled": True})
    grid = CountingGrid(fedml_app(secure), sites, cfg.to_flat())
    arrays = record_of({"w": from_numpy(np.zeros(params, dtype=np.float32))})
    messages = [
        Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
            dst_node_id=node,
            message_type="train",
        )
        for node in range(1, sites + 1)
    ]
    started = time.perf_counter()
    if secure:
        aggregate = SecureRound(cfg, 1, 0, grid, None).run(
            messages, arrays, Tally(), lambda s: s, set()
        )
    else:
        mean = WeightedMean()
        for reply in grid.send_and_receive(messages):
            mean.add(reply.content["arrays"], EXAMPLES)
        aggregate = mean.result()
    seconds = time.perf_counter() - started
    assert aggregate is not None
    assert abs(float(to_numpy(aggregate["w"]).mean()) - 0.01) < 1e-3
    return seconds, grid.reply_bytes / sites


def flower_round(sites: int, params: int) -> tuple[float, float]:
    """(seconds, bytes per site) of one round of Flower's SecAgg+ legacy workflow."""
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    class Client(NumPyClient):
        def fit(self, parameters, config):
            return [p + np.float32(0.01) for p in parameters], EXAMPLES, {}

    app = ClientApp(client_fn=lambda context: Client().to_client(), mods=[secaggplus_mod])
    grid = CountingGrid(app, sites, {})
    initial = ndarrays_to_parameters([np.zeros(params, dtype=np.float32)])
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=sites,
        min_available_clients=sites,
        initial_parameters=initial,
    )
    state = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(context=state, config=ServerConfig(num_rounds=1), strategy=strategy)
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=NEIGHBOURS + 1, reconstruction_threshold=THRESHOLD
        )
    )
    started = time.perf_counter()
    workflow(grid, context)
    return time.perf_counter() - started, grid.reply_bytes / sites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    print(
        "| sites | parameters | plain s | fedml secagg s | flower secagg+ s | fedml / flower "
        "| KB/site plain | fedml secagg | flower secagg+ |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for sites in args.sites:
        for params in args.params:
            plain = min(fedml_round(sites, params, False) for _ in range(args.repeats))
            ours = min(fedml_round(sites, params, True) for _ in range(args.repeats))
            flower = min(flower_round(sites, params) for _ in range(args.repeats))
            print(
                f"| {sites} | {params:,} | {plain[0]:.2f} | {ours[0]:.2f} | {flower[0]:.2f} "
                f"| {ours[0] / flower[0]:.2f} | {plain[1] / 1024:.0f} | {ours[1] / 1024:.0f} "
                f"| {flower[1] / 1024:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
