"""The fedml ServerApp and its round loop.

One loop serves every engine (in-process, Flower's Simulation Runtime, real SuperNodes):
it only talks to a Flower `Grid` and a Flower `Strategy`.

    for round r in (last committed round + 1)..rounds:
        messages = strategy.configure_train(r, arrays, config, grid)
        replies  = grid.send_and_receive(messages)         # stragglers shaped here
        arrays, train_metrics = strategy.aggregate_train(r, replies)
        evaluate = federated (strategy.configure/aggregate_evaluate) + centralized
        store.commit(r, arrays, history row, component state, node state)

Resume is the same loop started from a checkpoint: no second code path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedml.arrays import from_state_dict, to_state_dict
from fedml.config import RunConfig
from fedml.data import Federation, federation_for
from fedml.models import model_for
from fedml.runstore import Checkpoint, RunStore, default_run_path

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]
STOP_MAX_ROUNDS = "max rounds"


@dataclass
class RunSummary:
    """What a finished run reports."""

    run_dir: Path
    rounds: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None
    stop_reason: str | None = None

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


class CentralEvaluator:
    """Evaluates the global model on the server's held-out test set."""

    def __init__(self, cfg: RunConfig, federation: Federation) -> None:
        from clients.trainer import resolve_device

        self.test = federation.test
        self.device = resolve_device(cfg.client.device)
        self.model = model_for(cfg, federation.input_shape, federation.num_classes)

    def __call__(self, arrays: ArrayRecord) -> dict[str, float] | None:
        from clients.trainer import evaluate

        if self.test is None:
            return None
        self.model.load_state_dict(to_state_dict(arrays), strict=True)
        loss, accuracy = evaluate(self.model, self.test, self.device)
        return {"loss": loss, "accuracy": accuracy}


def train_config(cfg: RunConfig) -> ConfigRecord:
    """The local-training settings every train message carries."""
    c = cfg.client
    return ConfigRecord(
        {
            "local-epochs": c.local_epochs,
            "batch-size": c.batch_size,
            "lr": c.lr,
            "optimizer": c.optimizer,
            "momentum": c.momentum,
            "weight-decay": c.weight_decay,
        }
    )


@dataclass
class Experiment:
    """Everything a run needs, built and checked before anything is written to disk."""

    cfg: RunConfig
    strategy: Strategy
    evaluator: CentralEvaluator

    @classmethod
    def prepare(cls, cfg: RunConfig) -> Experiment:
        """Load the data, build the model and the strategy; a user error here raises
        `FedmlError` while the run directory does not exist yet."""
        from strategies import build_strategy

        return cls(cfg, build_strategy(cfg), CentralEvaluator(cfg, federation_for(cfg)))


def run_experiment(
    grid: Grid,
    experiment: Experiment,
    store: RunStore,
    on_round: RoundCallback | None = None,
    checkpoint: Checkpoint | None = None,
) -> RunSummary:
    """Run rounds up to `cfg.rounds` on `grid`, committing each one to `store`.

    With a `checkpoint` the run continues after its round: global arrays, component
    state (strategy, scenarios) and per-node state come from the commit, so the rounds
    that follow are the ones an uninterrupted run would have played.
    """
    from simulations.scenarios import Stragglers

    started = time.perf_counter()
    cfg, evaluator = experiment.cfg, experiment.evaluator
    components: dict[str, Any] = {
        "strategy": experiment.strategy,
        "stragglers": Stragglers(cfg.simulation.stragglers, seed=cfg.seed + 1),
    }
    arrays = from_state_dict(evaluator.model.state_dict())
    if checkpoint is not None:
        arrays = checkpoint.arrays
        restore_components(components, checkpoint.state)
        if hasattr(grid, "load_node_states"):
            grid.load_node_states(checkpoint.node_states)
    done = checkpoint.round if checkpoint else 0
    history = store.rows
    stop_reason = checkpoint.stop_reason if checkpoint and done >= cfg.rounds else None

    try:
        for server_round in range(done + 1, cfg.rounds + 1):
            round_start = time.perf_counter()
            arrays, row = train_round(server_round, arrays, grid, experiment, components)
            store.stage(server_round, arrays)  # the model file is written during evaluation
            row.update(evaluate_round(server_round, arrays, grid, experiment))
            row["seconds"] = round(time.perf_counter() - round_start, 4)
            stop_reason = STOP_MAX_ROUNDS if server_round == cfg.rounds else None
            store.commit(
                server_round,
                arrays,
                row,
                state=capture_components(components),
                node_states=grid.node_states() if hasattr(grid, "node_states") else None,
                stop_reason=stop_reason,
            )
            history.append(row)
            if on_round:
                on_round(row)
    finally:
        store.close()
    return RunSummary(
        store.path,
        len(history),
        time.perf_counter() - started,
        history,
        resumed_from=checkpoint.round if checkpoint else None,
        stop_reason=stop_reason,
    )


def train_round(
    server_round: int,
    arrays: ArrayRecord,
    grid: Grid,
    experiment: Experiment,
    components: dict[str, Any],
) -> tuple[ArrayRecord, dict[str, Any]]:
    """Configure, send, aggregate. Returns the new global arrays and the round's history
    row so far (round, train metrics, client counts)."""
    cfg, strategy = experiment.cfg, experiment.strategy
    messages = list(strategy.configure_train(server_round, arrays, train_config(cfg), grid))
    straggler_ids = components["stragglers"].apply(messages, cfg.client.local_epochs)
    replies = list(grid.send_and_receive(messages))
    ok = [m for m in replies if not m.has_error()]
    keeps_partial_work = getattr(strategy, "keeps_partial_work", False)
    kept = (
        ok if keeps_partial_work else [m for m in ok if m.metadata.src_node_id not in straggler_ids]
    )
    new_arrays, train_metrics = strategy.aggregate_train(server_round, kept)
    row = {
        "round": server_round,
        "train": _with_examples(train_metrics, kept),
        "clients": {
            "sampled": len(messages),
            "replied": len(ok),
            "failed": len(messages) - len(ok),
            "stragglers": len(straggler_ids),
            "aggregated": len(kept),
        },
    }
    return (arrays if new_arrays is None else new_arrays), row


def evaluate_round(
    server_round: int,
    arrays: ArrayRecord,
    grid: Grid,
    experiment: Experiment,
) -> dict[str, Any]:
    """Federated and centralised evaluation of the new global arrays: the history row's
    "evaluate" and "server" entries."""
    strategy = experiment.strategy
    messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
    replies = list(grid.send_and_receive(messages))
    metrics = strategy.aggregate_evaluate(server_round, replies)
    return {
        "evaluate": _with_examples(metrics, [m for m in replies if not m.has_error()]),
        "server": experiment.evaluator(arrays),
    }


def capture_components(components: dict[str, Any]) -> dict[str, Any]:
    """`state_dict()` of every component that has one (the stateful-component protocol)."""
    return {
        name: component.state_dict()
        for name, component in components.items()
        if callable(getattr(component, "state_dict", None))
    }


def restore_components(components: dict[str, Any], state: dict[str, Any]) -> None:
    """Give each component its committed state; say so when one cannot take it."""
    for name, component in components.items():
        loader = getattr(component, "load_state_dict", None)
        if callable(loader) and name in state:
            loader(state[name])
        else:
            log.warning(
                "%s %s has no committed state (no state_dict()/load_state_dict()); "
                "its internal state restarts on resume",
                name,
                type(component).__name__,
            )


def _with_examples(metrics: MetricRecord | None, replies: list[Message]) -> dict[str, Any] | None:
    """Aggregated metrics plus the total example count of the replies behind them."""
    if metrics is None:
        return None
    total = sum(
        int(next(iter(m.content.metric_records.values())).get("num-examples", 0)) for m in replies
    )
    return {**{k: v for k, v in metrics.items()}, "num-examples": total}


# ------------------------------------------------------------------------ the ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point under Flower's runtimes (`flwr run`): the same loop as `fedml simulate`."""
    cfg = RunConfig.from_flat(dict(context.run_config))
    experiment = Experiment.prepare(cfg)
    store = RunStore.create(Path(cfg.out) if cfg.out else default_run_path(), cfg)
    run_experiment(grid, experiment, store)
