"""What each strategy resists: final test accuracy under a fixed set of hostile sites.

Every cell is one in-process run of fedml's own round loop (validation on, as by
default) on digits, 10 sites, logistic regression, 1 local epoch: the same training as
an honest run, except that the sites named by the attack answer as an attacker would.

    python -m bench.attacks [--rounds 10] [--clients 10]

Attacks (the hostile sites are the first to reply in every round, the worst case for a
screen that judges replies as they arrive):

- honest: nobody attacks (the baseline each cell is read against);
- scaled x1000 (1 site): w_global + 1000 * its honest update;
- colluders x1000 (2 sites): both scale by 1000 from round 2 on, after an honest round 1;
- sign flip x4 (3 sites): w_global - 4 * the honest update (under the 10x norm screen);
- weight grab (1 site): a random update of an honest norm, claiming 10**12 examples;
- malformed (2 sites): arrays that do not decode (object dtype, a damaged header);
- metric lie (2 sites): evaluation replies claiming accuracy 5.0 over 10**9 examples;
- in-range lie (2 sites): evaluation replies claiming accuracy 1.0 over 10**9 examples,
  in a run that stops at `--target "evaluate.accuracy >= 0.8"` (the cell says when a
  target fired);
- colluders x1000 (3 sites): as the two colluders, one more;
- all five at once (5 sites): sites 1-2 scaled x1000, site 3 the weight grab, site 4
  malformed arrays, site 5 the metric lie (issue 34's mix).

Prints one row per strategy, one column per attack: the final server-side accuracy on
the held-out test set (higher is better; compare with the honest column).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

STRATEGIES: dict[str, dict] = {
    "fedavg": {},
    "fedprox": {},
    "fedmedian": {},
    "fedtrimmedavg": {},
    "krum": {"strategy.num_malicious_nodes": 2},
    "multikrum": {"strategy.num_malicious_nodes": 2, "strategy.num_nodes_to_select": 5},
    "bulyan": {"strategy.num_malicious_nodes": 1},
}
Tamper = Callable[[Message, Message], Message]  # (request, honest reply) -> what is sent


def _round(msg: Message) -> int:
    return int(msg.content["config"]["server-round"])


def _moved(request: Message, reply: Message, step: Callable[[np.ndarray, np.ndarray], np.ndarray]):
    """The reply with each float array set to step(global, trained)."""
    arrays = {}
    for key, sent in request.content["arrays"].items():
        trained = reply.content["arrays"][key].numpy()
        start = sent.numpy()
        moved = step(start, trained) if trained.dtype.kind == "f" else trained
        arrays[key] = Array(np.asarray(moved).astype(trained.dtype))
    reply.content["arrays"] = ArrayRecord(arrays)
    return reply


def scaled(factor: float, from_round: int = 1) -> Tamper:
    def tamper(request: Message, reply: Message) -> Message:
        if _round(request) < from_round:
            return reply
        return _moved(request, reply, lambda g, w: g + factor * (w - g))

    return tamper


def weight_grab(request: Message, reply: Message) -> Message:
    rng = np.random.default_rng(_round(request))

    def random_direction(g: np.ndarray, w: np.ndarray) -> np.ndarray:
        noise = rng.normal(size=w.shape)
        return g + noise / np.linalg.norm(noise) * np.linalg.norm(w - g)

    reply = _moved(request, reply, random_direction)
    reply.content["metrics"]["num-examples"] = 10**12
    return reply


def malformed(request: Message, reply: Message) -> Message:
    arrays = dict(reply.content["arrays"].items())
    first = next(iter(arrays))
    honest = arrays[first]
    arrays[first] = Array(
        dtype="object", shape=honest.shape, stype=honest.stype, data=b"\x93NUMPY\x01\x00junk"
    )
    reply.content["arrays"] = ArrayRecord(arrays)
    return reply


def metric_lie(request: Message, reply: Message) -> Message:
    reply.content["metrics"] = MetricRecord({"loss": 0.0, "accuracy": 5.0, "num-examples": 10**9})
    return reply


def in_range_lie(request: Message, reply: Message) -> Message:
    reply.content["metrics"] = MetricRecord({"loss": 0.0, "accuracy": 1.0, "num-examples": 10**9})
    return reply


def by_site(tampers: dict[int, Tamper]) -> Tamper:
    """Each hostile site (by node id) with its own tamper; the others reply honestly."""

    def tamper(request: Message, reply: Message) -> Message:
        chosen = tampers.get(request.metadata.dst_node_id)
        return chosen(request, reply) if chosen else reply

    return tamper


MIX_TRAIN = by_site({1: scaled(1000.0), 2: scaled(1000.0), 3: weight_grab, 4: malformed})
MIX_EVALUATE = by_site({5: metric_lie})
TARGET = {"stop.target": "evaluate.accuracy >= 0.8"}

# name -> (hostile sites, what they do to training replies, to evaluation replies, and
# the run's options for this attack)
ATTACKS: dict[str, tuple[int, Tamper | None, Tamper | None, dict]] = {
    "honest": (0, None, None, {}),
    "scaled x1000": (1, scaled(1000.0), None, {}),
    "colluders x1000": (2, scaled(1000.0, from_round=2), None, {}),
    "colluders x1000 (3)": (3, scaled(1000.0, from_round=2), None, {}),
    "sign flip x4": (3, scaled(-4.0), None, {}),
    "weight grab": (1, weight_grab, None, {}),
    "malformed": (2, malformed, None, {}),
    "metric lie": (2, None, metric_lie, {}),
    "in-range lie": (2, None, in_range_lie, TARGET),
    "all five at once": (5, MIX_TRAIN, MIX_EVALUATE, {}),
}


def hostile_app(sites: int, train: Tamper | None, evaluate: Tamper | None) -> ClientApp:
    """fedml's ClientApp, with nodes 1..`sites` tampering with their replies."""
    from clients import app as fedml_client

    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        reply = fedml_client.train(msg, context)
        hostile = train is not None and msg.metadata.dst_node_id <= sites
        return train(msg, reply) if hostile else reply

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        reply = fedml_client.evaluate_global(msg, context)
        hostile = evaluate is not None and msg.metadata.dst_node_id <= sites
        return evaluate(msg, reply) if hostile else reply

    return app


def final_accuracy(strategy: str, attack: str, rounds: int, clients: int, work: Path) -> str:
    """The cell: the test accuracy of the run's final model, and why it stopped when
    that was not its last round (a guard or the participation rules ended it)."""
    from fedml.config import load_config
    from fedml.runstore import RunStore
    from fedml.server import Experiment, run_experiment
    from simulations.inprocess import InProcessGrid

    options = {
        "rounds": rounds,
        "simulation.clients": clients,
        "model.name": "logreg",
        "client.local_epochs": 1,
        "strategy.name": strategy,
        **STRATEGIES[strategy],
        "out": str(work / "".join(c if c.isalnum() else "-" for c in f"{strategy}-{attack}")),
    }
    sites, train, evaluate, extra = ATTACKS[attack]
    cfg = load_config(None, {**options, **extra})
    grid = InProcessGrid(hostile_app(sites, train, evaluate), clients, cfg.to_flat())
    store = RunStore.create(Path(cfg.out), cfg)
    summary = run_experiment(grid, Experiment.prepare(cfg), store)
    scored = [row for row in summary.history if "server" in row]
    cell = f"{scored[-1]['server']['accuracy']:.3f}" if scored else "-"
    if summary.stop_reason != "max rounds":
        cell += f" ({summary.stop_reason} at round {len(summary.history)})"
    return cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()
    import logging

    import flwr.supercore.logger  # noqa: F401 - Flower sets its level when imported

    logging.getLogger("flwr").setLevel(logging.WARNING)  # one table, not Flower's chatter
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedml-bench-attacks-") as folder:
        table = {
            strategy: {
                attack: final_accuracy(strategy, attack, args.rounds, args.clients, Path(folder))
                for attack in ATTACKS
            }
            for strategy in STRATEGIES
        }
    print(
        f"final test accuracy, digits, {args.clients} sites, {args.rounds} rounds, "
        "fedml's validation on (hostile sites reply first)"
    )
    print("| strategy | " + " | ".join(ATTACKS) + " |")
    print("| --- " * (len(ATTACKS) + 1) + "|")
    for strategy, row in table.items():
        print(f"| {strategy} | " + " | ".join(row[a] for a in ATTACKS) + " |")
    print(f"(bench wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
