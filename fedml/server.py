"""The fedml ServerApp and its round loop.

One loop serves every engine (in-process, Flower's Simulation Runtime, real SuperNodes):
it only talks to a Flower `Grid` and a Flower `Strategy`.

    for round r in (last committed round + 1).. until a control says stop:
        repeat (a retry re-samples clients):
            messages = strategy.configure_train(r, arrays, config with lr/mu, grid)
            replies  = grid.send_and_receive(messages)      # dropout, stragglers, timeout
            (privacy report notes each client's epsilon, or its refusal to train)
            aggregate = strategy.aggregate_train(r, screened replies)   # streamed
            too few updates?      -> retry | skip | stop      (participation;
                                     stop "privacy budget" when clients declined)
            arrays' = server optimiser(arrays, aggregate)    (FedAvgM)
            evaluate arrays' (federated + centralised)
            loss diverged?        -> roll back, lower lr, retry | stop   (guard)
        stop = early stop | target | time budget | max rounds | privacy budget | None
        store.commit(r, arrays', history row, component state, node state)

Resume is the same loop started from a checkpoint: no second code path.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from clients.personal import FEDPER, head_names
from clients.trainer import evaluation_metrics, resolve_device
from fedml.arrays import from_state_dict, to_state_dict
from fedml.components import RoundComponents
from fedml.config import (
    SERVER_LOCAL,
    SERVER_LOCAL_ENV,
    RunConfig,
    check_data_path,
    with_server_local,
)
from fedml.contracts import (
    NodeStateGrid,
    Retractable,
    SecureReleaser,
    is_proximal,
    keeps_partial_work,
)
from fedml.controls import EXTENSIBLE_STOPS
from fedml.data import Federation, federation_for
from fedml.data.features import Standardization
from fedml.errors import FedmlError
from fedml.models import describe_model, model_for, with_standardization
from fedml.preprocessing import FeatureScaling, wants_standardization, warn_if_unscaled
from fedml.privacy import without_privacy_keys
from fedml.records import (
    DEVICE_RECORD,
    HistoryRow,
    device_label,
)
from fedml.reply_stream import PollingGrid
from fedml.run_audit import RunTrail
from fedml.runstore import Checkpoint, RunStatus, RunStore, open_run
from fedml.secure_round import SecureRound
from fedml.settings import FINE_TUNE_KEY, NUM_CLASSES_KEY, TrainSettings, message_key
from fedml.site_results import federated_entry, site_results
from fedml.validation import (
    Tally,
    UpdateValidator,
    site_medians,
)
from simulations.virtual_nodes import SimulatedNodesGrid
from strategies import build_strategy

log = logging.getLogger(__name__)

RoundCallback = Callable[[HistoryRow], None]


@dataclass
class RunSummary:
    """What a finished run reports."""

    run_dir: Path
    rounds: int
    seconds: float
    history: list[HistoryRow] = field(default_factory=list)
    resumed_from: int | None = None
    stop_reason: str | None = None
    model_round: int | None = None

    @classmethod
    def from_status(cls, status: RunStatus, seconds: float, resumed_from: int | None) -> RunSummary:
        """The summary of a run that another process played (the ServerApp under `flwr
        run`: the Ray engine, `fedml server`), read from its run directory."""
        return cls(
            status.path,
            status.rounds_done,
            seconds,
            status.rows,
            resumed_from=resumed_from,
            stop_reason=status.stop_reason,
            model_round=status.model_round,
        )

    @property
    def final(self) -> HistoryRow:
        return self.history[-1] if self.history else {}


class CentralEvaluator:
    """Evaluates the global model on the server's held-out test set."""

    def __init__(self, cfg: RunConfig, federation: Federation) -> None:
        self.test = federation.test
        self.num_classes = federation.num_classes
        self.input_shape = federation.input_shape
        self.feature_names = federation.feature_names
        self.device = resolve_device(cfg.client.device)
        self.model = model_for(cfg, federation.input_shape, federation.num_classes)

    def standardize(self, standardization: Standardization) -> None:
        """Evaluate with the run's federated standardisation (the model takes raw rows)."""
        with_standardization(self.model, standardization)

    def __call__(self, arrays: ArrayRecord) -> dict[str, float] | None:
        """Loss and accuracy on the test set (and, for two classes, the clinical
        metrics of `fedml.metrics`, AUROC exact on these rows)."""
        if self.test is None:
            return None
        self.model.load_state_dict(to_state_dict(arrays), strict=True)
        metrics = evaluation_metrics(self.model, self.test, self.device)
        metrics.pop("num-examples")
        return metrics


@dataclass
class Experiment:
    """Everything a run needs, built and checked before anything is written to disk."""

    cfg: RunConfig
    strategy: Strategy
    evaluator: CentralEvaluator
    validator: UpdateValidator
    standardize: bool = False  # gather the sites' feature statistics before round 1

    @classmethod
    def prepare(
        cls, cfg: RunConfig, reproducible: bool = True, sites_hold_data: bool = False
    ) -> Experiment:
        """Load the data, build the model and the strategy; a user error here raises
        `FedmlError` while the run directory does not exist yet. `reproducible`: DP noise
        drawn on the server follows the run seed (simulation; a deployment draws secret
        noise from OS entropy). `sites_hold_data`: deployed, so the server reads only its
        own test set (`npz:<dir>` may hold just test.npz)."""
        check_data_path(cfg)
        v = cfg.validation
        validator = UpdateValidator(v.norm_factor, v.clip_norm, v.max_weight_factor)
        strategy = build_strategy(cfg, reproducible)
        federation = federation_for(cfg, sites_hold_data)
        standardize = wants_standardization(cfg, federation)
        if not standardize:
            warn_if_unscaled(federation)
            refuse_missing_values(federation)
        evaluator = CentralEvaluator(cfg, federation)
        if cfg.client.personal == FEDPER:
            head_names(evaluator.model)  # refuses a model with no body to share
        return cls(cfg, strategy, evaluator, validator, standardize)

    def scaling(self) -> FeatureScaling:
        """The run's (not yet gathered) federated standardisation: its sums taken around
        the server's test-set means (0 without a test set)."""
        features = math.prod(self.evaluator.input_shape)
        test = self.evaluator.test
        shift = None
        if self.standardize and test is not None and len(test):
            with warnings.catch_warnings():  # a column of NaN only: its shift is 0
                warnings.simplefilter("ignore", RuntimeWarning)
                shift = np.nan_to_num(np.nanmean(test.x.reshape(len(test), -1), axis=0))
        spread = None  # the fixed-point units of statistics gathered under secagg
        if self.standardize and self.cfg.secagg.enabled and test is not None and len(test):
            with warnings.catch_warnings():  # a column of NaN only: its spread is unknown
                warnings.simplefilter("ignore", RuntimeWarning)
                spread = np.nanstd(test.x.reshape(len(test), -1), axis=0)
        return FeatureScaling(
            self.standardize,
            features,
            self.cfg.strategy.min_train_clients,
            shift=shift,
            max_weight_factor=self.cfg.validation.max_weight_factor,
            feature_names=self.evaluator.feature_names,
            secagg_cfg=self.cfg if self.cfg.secagg.enabled else None,
            spread=spread,
        )


def refuse_missing_values(federation: Federation) -> None:
    """Without standardisation nothing imputes a missing value: refuse data that has
    some (the server's test set, or simulated clients' shards) before anything is
    written. A deployed site refuses its own alike."""
    where = "the clients' data" if federation.has_missing else None
    if federation.test is not None and np.isnan(federation.test.x).any():
        where = "the server's test set"
    if where:
        raise FedmlError(
            f"{where[0].upper()}{where[1:]} has missing values (NaN), and this run does not "
            "impute them. Set data.preprocess = 'auto' or 'standardize' (a missing value "
            "then becomes its feature's mean across the sites), or fill them first."
        )


def run_experiment(
    grid: Grid,
    experiment: Experiment,
    store: RunStore,
    on_round: RoundCallback | None = None,
    checkpoint: Checkpoint | None = None,
) -> RunSummary:
    """Play rounds on `grid` until a control stops the run, committing each to `store`.

    With a `checkpoint` the run continues after its round: global arrays, component
    state (strategy, scenarios, controls) and per-node state come from the commit, so the
    rounds that follow are the ones an uninterrupted run would have played.
    """
    started = time.perf_counter()
    cfg, evaluator = experiment.cfg, experiment.evaluator
    components = RoundComponents.for_run(cfg, experiment.strategy, experiment.scaling())
    controls = components.controls
    arrays = from_state_dict(evaluator.model.state_dict())
    if checkpoint is not None:
        _check_architecture(arrays, checkpoint.arrays, cfg.model.name)
        arrays = checkpoint.arrays
        components.restore(checkpoint.state)
        if isinstance(grid, NodeStateGrid):
            grid.load_node_states(checkpoint.node_states)
    history = store.rows
    elapsed = sum(row.get("seconds", 0.0) for row in history)
    stop_reason = _still_stopped(checkpoint, cfg, elapsed)
    server_round = checkpoint.round if checkpoint else 0
    trail = RunTrail(store.path)
    trail.started(cfg, server_round, resumed=checkpoint is not None)
    scaling, announce = components.scaling, None
    if checkpoint is not None and not checkpoint.state.get("scaling") and scaling.enabled:
        # committed rounds trained on raw features (a run made before fedml standardised,
        # whose config.toml reads as data.preprocess = "auto" now): keep them raw
        log.warning("this run's commits hold no feature statistics: it keeps raw features")
        scaling.enabled = False

    try:
        if stop_reason is None and scaling.pending:
            scaling.gather(grid, cfg.participation.timeout or None, components.hostile)
            announce = scaling.row()  # told in the next committed row
        if scaling.standardization is not None:
            evaluator.standardize(scaling.standardization)
        store.model_description = describe_model(
            cfg, evaluator.input_shape, evaluator.num_classes, scaling.standardization
        )
        while stop_reason is None:
            server_round += 1
            round_start = time.perf_counter()
            arrays, row, stop_reason = play_round(
                server_round, arrays, grid, experiment, components, store
            )
            if announce:
                row["preprocess"], announce = announce, None
            row["seconds"] = round(time.perf_counter() - round_start, 4)
            elapsed += row["seconds"]
            stop_reason = (
                stop_reason
                or controls.end_of_round(row, elapsed)
                or components.privacy.budget_stop(
                    len(list(grid.get_node_ids())), cfg.participation.min_replies
                )
            )
            if stop_reason:
                row["stop"] = stop_reason
            store.commit(
                server_round,
                arrays,
                row,
                state=components.capture(),
                node_states=grid.node_states() if isinstance(grid, NodeStateGrid) else None,
                stop_reason=stop_reason,
                keep_round=controls.best_round,
                model_round=controls.model_round() if stop_reason else None,
            )
            # the trail follows the commit: a full disk fails the commit first, naming
            # the round; a crash between the two leaves the commit out of the trail,
            # whose next "resume" entry says which round the run went on after
            trail.seen(grid.get_node_ids())
            trail.committed(row, arrays, stop_reason)
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
        model_round=store.model_round,
    )


def _still_stopped(checkpoint: Checkpoint | None, cfg: RunConfig, elapsed: float) -> str | None:
    """The stop reason of a resumed run that has nothing left to do, else None. A run
    stopped by the round limit or the time budget goes on when those were raised."""
    if checkpoint is None or checkpoint.stop_reason is None:
        return None
    reason = checkpoint.stop_reason
    if reason not in EXTENSIBLE_STOPS:
        return reason
    more_rounds = checkpoint.round < cfg.rounds
    budget = cfg.stop.max_seconds
    more_time = budget == 0 or elapsed < budget
    return None if more_rounds and more_time else reason


def play_round(
    server_round: int,
    arrays: ArrayRecord,
    grid: Grid,
    experiment: Experiment,
    components: RoundComponents,
    store: RunStore,
) -> tuple[ArrayRecord, HistoryRow, str | None]:
    """Play one round, retrying it as the controls say. Returns the global arrays after
    the round, its history row, and a stop reason when the round ended the run."""
    controls = components.controls
    retries: list[str] = []
    while True:
        lr = controls.client_lr(server_round)
        aggregate, row = train_round(
            server_round, arrays, grid, experiment, components, lr, attempt=len(retries)
        )
        counts = row["clients"]
        aggregated = counts["aggregated"] if aggregate is not None else 0
        verdict = controls.judge_participation(
            aggregated, counts["replied"], row["rejected"].get("non-finite", 0), counts["declined"]
        )
        if verdict is None:
            assert aggregate is not None  # enough updates were aggregated
            new_arrays, velocity = controls.optimizer.step(arrays, aggregate)
            store.stage(server_round, new_arrays)  # the model file is written meanwhile
            row.update(
                evaluate_round(
                    server_round,
                    new_arrays,
                    grid,
                    experiment,
                    _evaluate_config(experiment, components, lr),
                )
            )
            verdict = controls.judge_loss(row)
            if verdict is None:
                controls.accept(row, velocity)
                privacy = components.privacy.row()
                if privacy is not None:
                    row["privacy"] = privacy
                if retries:
                    row["retries"] = retries
                components.screening.end_attempt(accepted=True)
                return new_arrays, row, None
            store.discard_staged()
        components.screening.end_attempt(accepted=False)
        if isinstance(experiment.strategy, Retractable):
            experiment.strategy.discard_attempt()  # undo what aggregating this attempt changed
        retries.append(verdict.reason or verdict.action)
        if verdict.action == "retry":
            log.warning("round %d: %s; retrying the round", server_round, verdict.reason)
            continue
        # skipped or stopped: the global model stays as it was before the round
        return arrays, _discarded_row(row, retries, verdict.reason), verdict.stop


def _evaluate_config(
    experiment: Experiment, components: RoundComponents, lr: float
) -> dict[str, Any]:
    """What evaluate messages carry besides the classes: the run's standardisation and,
    when sites fine-tune personal models, for how many epochs and at the round's
    learning rate (decayed, and scaled by the guard, as the round trained)."""
    epochs = experiment.cfg.client.fine_tune_epochs
    tuning = {FINE_TUNE_KEY: epochs, message_key("lr"): lr} if epochs else {}
    return {**components.scaling.config(), **tuning}


def _discarded_row(row: HistoryRow, retries: list[str], reason: str | None) -> HistoryRow:
    """The history row of a round that produced no model: who took part, and why not."""
    discarded: HistoryRow = {"round": row["round"], "lr": row["lr"]}
    if "mu" in row:
        discarded["mu"] = row["mu"]
    discarded["clients"] = row["clients"]
    discarded["rejected"] = row["rejected"]
    if "failed_reasons" in row:  # why the sites sent nothing: what the operator needs most
        discarded["failed_reasons"] = row["failed_reasons"]
    discarded["retries"] = retries
    discarded["discarded"] = reason
    return discarded


def train_round(
    server_round: int,
    arrays: ArrayRecord,
    grid: Grid,
    experiment: Experiment,
    components: RoundComponents,
    lr: float,
    attempt: int = 0,
) -> tuple[ArrayRecord | None, HistoryRow]:
    """Configure, send, screen, aggregate one training attempt. Replies stream from the
    grid through the validator into the strategy's aggregation, so the server never
    holds more than a few clients' arrays. Returns the aggregate (None when no update
    was aggregated) and the round's history row so far."""
    cfg, strategy = experiment.cfg, experiment.strategy
    settings = TrainSettings.for_round(cfg.client, lr).to_record(experiment.evaluator.num_classes)
    settings.update(components.scaling.config())
    messages = list(strategy.configure_train(server_round, arrays, settings, grid))
    to_send, dropped = components.dropout.apply(messages)
    straggler_ids = components.stragglers.apply(
        to_send, cfg.client.local_epochs, cfg.client.local_steps
    )
    timeout = cfg.participation.timeout or None
    tally, kept, privacy, devices = Tally(), _Kept(), components.privacy, _Devices()
    dropping = set() if keeps_partial_work(strategy) else straggler_ids
    secure = None
    if cfg.secagg.enabled:
        secure = SecureRound(cfg, server_round, attempt, grid, timeout)
        aggregate = secure.run(
            to_send,
            arrays,
            tally,
            lambda s: privacy.observe(devices.count(s)),
            dropping,
            components.hostile,
        )
        kept.messages = int(secure.row["unmasked"]) if aggregate is not None else 0
        if aggregate is not None and isinstance(strategy, SecureReleaser):
            aggregate = strategy.release_secure_mean(aggregate, kept.messages)
        kept.examples = secure.examples
        train_metrics = MetricRecord(secure.metrics) if secure.metrics is not None else None
    else:
        replies = privacy.observe(devices.count(grid.send_and_receive(to_send, timeout=timeout)))
        screened = experiment.validator.screen(replies, arrays, tally, components.screening)
        unless_stragglers = (m for m in screened if m.metadata.src_node_id not in dropping)
        aggregate, train_metrics = strategy.aggregate_train(
            server_round, kept.count(unless_stragglers)
        )
    row: HistoryRow = {"round": server_round, "lr": lr}
    if is_proximal(strategy):
        row["mu"] = strategy.proximal_mu
    row["train"] = without_privacy_keys(_with_examples(train_metrics, kept.examples))
    row["clients"] = {
        "sampled": len(messages),
        "dropped": len(dropped),
        "replied": tally.replied,
        "failed": tally.failed - privacy.declined + len(dropped),
        "declined": privacy.declined,
        "timed_out": len(to_send) - tally.replied - tally.failed,
        "rejected": sum(tally.rejected.values()),
        "stragglers": len(straggler_ids),
        "aggregated": kept.messages,
    }
    row["rejected"] = dict(sorted(tally.rejected.items()))
    if tally.failed_reasons:
        row["failed_reasons"] = dict(sorted(tally.failed_reasons.items()))
    if tally.capped:
        row["weights_capped"] = tally.capped
    if devices.replies:
        row["devices"] = dict(sorted(devices.replies.items()))
    if secure is not None:
        row["secagg"] = secure.row
    return (aggregate if kept.messages else None), row


class _Devices:
    """Counts the train replies per device they say they trained on."""

    def __init__(self) -> None:
        self.replies: dict[str, int] = {}

    def count(self, stream: Iterable[Message]) -> Iterator[Message]:
        for message in stream:
            record = (
                message.content.config_records.get(DEVICE_RECORD) if message.has_content() else None
            )
            if record is not None:
                label = device_label(dict(record))
                self.replies[label] = self.replies.get(label, 0) + 1
            yield message


class _Kept:
    """Counts the messages (and their examples) that a stream hands to aggregation."""

    def __init__(self) -> None:
        self.messages = 0
        self.examples = 0

    def count(self, stream: Iterable[Message]) -> Iterator[Message]:
        for message in stream:
            self.messages += 1
            self.examples += _num_examples(message)
            yield message


def evaluate_round(
    server_round: int,
    arrays: ArrayRecord,
    grid: Grid,
    experiment: Experiment,
    extra_config: dict[str, Any] | None = None,
) -> HistoryRow:
    """Federated and centralised evaluation of the new global arrays: the history row's
    "evaluate", "evaluate_median" and "server" entries (and "evaluate_rejected" when
    replies were bad). `extra_config` joins the evaluate messages' config (the run's
    standardisation)."""
    strategy = experiment.strategy
    settings = ConfigRecord(
        {NUM_CLASSES_KEY: experiment.evaluator.num_classes, **(extra_config or {})}
    )
    messages = list(strategy.configure_evaluate(server_round, arrays, settings, grid))
    timeout = experiment.cfg.participation.timeout or None
    tally = Tally()
    replies = experiment.validator.screen_evaluation(
        grid.send_and_receive(messages, timeout=timeout), tally
    )
    metrics = strategy.aggregate_evaluate(server_round, replies)
    result: HistoryRow = {
        "evaluate": federated_entry(
            _with_examples(metrics, sum(map(_num_examples, replies))), replies
        ),
        "server": experiment.evaluator(arrays),
    }
    if replies:
        result["evaluate_median"] = site_medians(replies, experiment.validator.weight_key)
        sites = site_results(replies)
        if sites:
            result["sites"] = sites
    if tally.rejected:
        result["evaluate_rejected"] = dict(sorted(tally.rejected.items()))
    if tally.capped:
        result["evaluate_weights_capped"] = tally.capped
    return result


def _num_examples(message: Message) -> int:
    return int(next(iter(message.content.metric_records.values())).get("num-examples", 0))


def _with_examples(metrics: MetricRecord | None, examples: int) -> dict[str, Any] | None:
    """Aggregated metrics plus the total example count of the replies behind them."""
    if metrics is None:
        return None
    return {**{k: v for k, v in metrics.items()}, "num-examples": examples}


# ------------------------------------------------------------------------ the ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point under Flower's runtimes (`flwr run`: `fedml server`, the Ray engine):
    the same loop as `fedml simulate`."""
    _exit_with_parent()
    cfg, flags = RunConfig.from_run_config(with_server_local(dict(context.run_config)))
    if cfg.out == SERVER_LOCAL["out"]:
        raise FedmlError(
            "This run's config was made by `fedml server`, which keeps the run directory "
            f"and test data out of what sites receive and hands them to its ServerApp in "
            f"{SERVER_LOCAL_ENV}; that variable is not set here. Start the run with "
            "`fedml server`."
        )
    # Simulated (the Ray engine): the run seed drives server-side DP noise too, and the
    # nodes are numbered like the in-process engine's; deployed: secret noise, real nodes.
    experiment = Experiment.prepare(
        cfg, reproducible=flags.simulated, sites_hold_data=not flags.simulated
    )
    if flags.simulated:
        grid = SimulatedNodesGrid(grid, cfg.simulation.clients)
    else:  # Flower's deployment Grid answers a phase 0-3 s after its last reply
        grid = PollingGrid(grid)
    resume = RunStore.open(Path(cfg.out)) if flags.resume else None
    store, checkpoint = open_run(cfg, resume, deployed=not flags.simulated)
    run_experiment(grid, experiment, store, checkpoint=checkpoint)


def _check_architecture(built: ArrayRecord, stored: ArrayRecord, name: str) -> None:
    """A clear error when the committed model is not the architecture `name` builds now
    (a run made by an earlier fedml whose `cnn` was a different network, say)."""
    shapes = {key: tuple(array.shape) for key, array in built.items()}
    if shapes != {key: tuple(array.shape) for key, array in stored.items()}:
        raise FedmlError(
            f"This run's committed model is not the network model '{name}' builds now "
            "(its layers or their shapes differ: the run was made by another fedml "
            "version). Resume it with the fedml that started it, or start a new run."
        )


def _exit_with_parent(interval: float = 1.0) -> None:
    """End this process as soon as the process that started it is gone (the SuperLink
    was killed): an orphaned ServerApp would otherwise hold the run directory's lock,
    waiting on a SuperLink that no longer exists, and block `fedml server --resume`.
    Exiting at any instant is safe: every commit is atomic, so at most the round in
    progress is lost (the same as a crash)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        log.error("the SuperLink that started this ServerApp is gone; exiting")
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
