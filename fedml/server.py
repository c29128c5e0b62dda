"""The fedml ServerApp and its round loop.

One loop serves every engine (in-process, Flower's Simulation Runtime, real SuperNodes):
it only talks to a Flower `Grid` and a Flower `Strategy`.

    for round r in 1..rounds:
        messages = strategy.configure_train(r, arrays, config, grid)
        replies  = grid.send_and_receive(messages)         # stragglers shaped here
        arrays, train_metrics = strategy.aggregate_train(r, replies)
        evaluate = federated (strategy.configure/aggregate_evaluate) + centralized
        run_dir.commit_round(arrays, history row)
"""

from __future__ import annotations

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
from fedml.runstore import RunDir, default_run_path

RoundCallback = Callable[[dict[str, Any]], None]


@dataclass
class RunSummary:
    """What a finished run reports."""

    run_dir: Path
    rounds: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)

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
    run_dir: RunDir,
    on_round: RoundCallback | None = None,
) -> RunSummary:
    """Run `cfg.rounds` rounds of federated training on `grid`, committing each round."""
    from simulations.scenarios import Stragglers

    started = time.perf_counter()
    cfg, strategy, evaluator = experiment.cfg, experiment.strategy, experiment.evaluator
    arrays = from_state_dict(evaluator.model.state_dict())
    stragglers = Stragglers(cfg.simulation.stragglers, seed=cfg.seed + 1)
    keeps_partial_work = getattr(strategy, "keeps_partial_work", False)

    history: list[dict[str, Any]] = []
    for server_round in range(1, cfg.rounds + 1):
        round_start = time.perf_counter()
        messages = list(strategy.configure_train(server_round, arrays, train_config(cfg), grid))
        straggler_ids = stragglers.apply(messages, cfg.client.local_epochs)
        replies = list(grid.send_and_receive(messages))
        ok = [m for m in replies if not m.has_error()]
        kept = (
            ok
            if keeps_partial_work
            else [m for m in ok if m.metadata.src_node_id not in straggler_ids]
        )
        new_arrays, train_metrics = strategy.aggregate_train(server_round, kept)
        if new_arrays is not None:
            arrays = new_arrays

        eval_messages = list(
            strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
        )
        eval_replies = list(grid.send_and_receive(eval_messages))
        eval_metrics = strategy.aggregate_evaluate(server_round, eval_replies)

        row = {
            "round": server_round,
            "train": _with_examples(train_metrics, kept),
            "evaluate": _with_examples(
                eval_metrics, [m for m in eval_replies if not m.has_error()]
            ),
            "server": evaluator(arrays),
            "clients": {
                "sampled": len(messages),
                "replied": len(ok),
                "failed": len(messages) - len(ok),
                "stragglers": len(straggler_ids),
                "aggregated": len(kept),
            },
            "seconds": round(time.perf_counter() - round_start, 4),
        }
        run_dir.commit_round(arrays, row)
        history.append(row)
        if on_round:
            on_round(row)
    return RunSummary(run_dir.path, len(history), time.perf_counter() - started, history)


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
    run_dir = RunDir.create(Path(cfg.out) if cfg.out else default_run_path(), cfg)
    run_experiment(grid, experiment, run_dir)
