"""The fedml ClientApp: local training and evaluation on a node's private shard.

Which shard a node holds comes from its Flower node config: `data-path` (set by `fedml
client` at a data site) names the site's prepared data (`fedml.data.site`); otherwise
`partition-id` (set by the in-process engine and by Flower's Simulation Runtime) selects
a client of the configured dataset. A site's node config may also set `device` (over
the run config's `client.device`), `privacy-ledger` (the site's ledger file) and
`label-column` (of a CSV `data-path`).

The run config (`context.run_config`, fedml's flat RunConfig) names the dataset, model
and default training settings; each train message's "config" may override the settings
("num-classes", "local-epochs", "batch-size", "lr", "optimizer", "momentum", "weight-decay",
"proximal-mu"), so a stock Flower strategy that sends only "server-round" works too.

With `dp.mode = "sample"` training is DP-SGD (clients/privacy.py): the reply's metrics
add "dp-epsilon" and "dp-delta" (what this client has spent so far), and a client whose
budget would be exceeded replies with an error of code `fedml.privacy.DECLINED_CODE`
saying why, instead of training.

Replies follow Flower's conventions: "arrays" (the trained state dict) and "metrics"
(`loss`, `num-examples`; evaluation adds `accuracy`, and for two classes the clinical
metrics of `fedml.metrics`). A train reply adds the ConfigRecord "device" (`device`:
where it trained, e.g. "cpu" or "cuda:0"; `name`: the GPU's name). An evaluate reply
adds the ConfigRecord "site": the site's name, the global model's metrics on the site's
own test rows ("test-..."), and with "fine-tune-epochs" in the message those of a
personal model fine-tuned here ("personal-...", "personal-test-..."; never sent).

When the run standardises its features, each train and evaluate message carries the
statistics ("preprocess-mean", "preprocess-scale") and the model applies them to the
node's raw rows (`fedml.models.with_standardization`); before round 1 the
`feature_stats` query handler answers with the node's per-feature counts, sums and sums
of squares (`fedml.data.features`), never a row.

Under secure aggregation (`secagg.enabled`) the app also answers the "train.secagg_keys",
"train.secagg_share" and "train.secagg_unmask" messages (clients/secagg.py), and a train
message that carries the round's secure-aggregation record is answered with the masked
update alone: no arrays, no example count, no loss.

Under the Ray engine the app also answers Flower query messages with its partition-id,
and its `carry_node_state` mod takes the node's state from (and returns it in) each
message (see simulations/virtual_nodes.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from clients import personal, scaffold, secagg
from clients.trainer import TrainResult, evaluation_metrics, resolve_device, train_local
from fedml.arrays import from_state_dict, to_numpy, to_state_dict
from fedml.config import RunConfig
from fedml.data import Shard, federation_for, split_validation
from fedml.data.features import (
    SECURE_LIMIT_KEY,
    SECURE_UNITS_KEY,
    SHIFT_KEY,
    STATS_ACTION,
    FeatureStats,
    Standardization,
)
from fedml.data.site import DEFAULT_LABEL_COLUMN, X_FILE, load_prepared, read_site_data
from fedml.errors import FedmlError
from fedml.models import model_for, with_standardization
from fedml.node_state import (
    PARTITION_KEY,
    PARTITIONS_KEY,
    SITE_NAME_KEY,
    TEST_DATA_KEY,
    carry_node_state,
)
from fedml.privacy import DECLINED_CODE, DELTA_KEY, EPSILON_KEY
from fedml.privacy_ledger import PrivacyLedger, plan_round
from fedml.records import DEVICE_RECORD, PERSONAL_PREFIX, SITE_RECORD, TEST_PREFIX
from fedml.secagg import fixed_point
from fedml.secagg import messages as wire
from fedml.settings import (
    CONTROL_RECORD,
    FINE_TUNE_KEY,
    NUM_CLASSES_KEY,
    SERVER_ROUND_KEY,
    TrainSettings,
)

app = ClientApp(mods=[carry_node_state])
PERSONAL_STREAM = 1  # the fine-tuning's seed stream, apart from the round's training
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalJob:
    """One node's view of the run: its data split, its model, its device."""

    cfg: RunConfig
    partition_id: int | None  # a simulated client's index; None at a data site
    train: Shard
    val: Shard
    input_shape: tuple[int, ...]
    num_classes: int  # a site's guess from its labels; the server's "num-classes" wins
    device: str
    has_missing: bool = False  # the features hold missing values (NaN)
    site_name: str = ""  # how evaluation replies name this site
    test: Shard | None = None  # the site's own test rows, never trained on

    @classmethod
    def from_context(cls, context: Context) -> LocalJob:
        """The job for this node and run (kept per process: a node loads its data once)."""
        run_config = tuple(sorted(context.run_config.items()))
        node = context.node_config
        if "data-path" in node:
            return _site_job(
                run_config,
                str(node["data-path"]),
                str(node.get("device", "")),
                str(node.get("label-column", DEFAULT_LABEL_COLUMN)),
                str(node.get(SITE_NAME_KEY, "")),
                str(node.get(TEST_DATA_KEY, "")),
            )
        if PARTITION_KEY not in node:
            raise ValueError(
                "node config has neither 'data-path' (a data site: start it with fedml "
                "client --data) nor 'partition-id' (a simulated client): it holds no data"
            )
        partitions = int(node.get(PARTITIONS_KEY, 0))  # type: ignore[arg-type]
        return _local_job(run_config, int(node[PARTITION_KEY]), partitions)

    @classmethod
    def load(cls, cfg: RunConfig, pid: int) -> LocalJob:
        """Materialise client `pid`'s shard and split off its validation part."""
        federation = federation_for(cfg)
        train, val = split_validation(
            federation.client(pid), cfg.data.val_fraction, seed=_derive_seed(cfg.seed, pid)
        )
        return cls(
            cfg,
            pid,
            train,
            val,
            federation.input_shape,
            federation.num_classes,
            cfg.client.device,
            federation.has_missing and _has_missing(train, val),
            federation.names[pid] if federation.names else f"client-{pid}",
            federation.site_tests[pid] if federation.site_tests else None,
        )

    @classmethod
    def load_site(
        cls,
        cfg: RunConfig,
        path: Path,
        device: str,
        label_column: str = DEFAULT_LABEL_COLUMN,
        name: str = "",
        test_path: Path | None = None,
    ) -> LocalJob:
        """A data site's job: its data split like a simulated client's, on the site's
        device when its node config names one. `path` is the folder `fedml client`
        prepared (memory-mapped), or the site's own file (read every time: a plain
        `flower-supernode --node-config 'data-path=...'` works, just slower);
        `test_path` likewise holds the site's own test rows (`fedml client --test-data`:
        evaluated on, never trained on)."""
        shard = _site_rows(path, label_column)
        test = _site_rows(test_path, label_column) if test_path is not None else None
        train, val = split_validation(shard, cfg.data.val_fraction, seed=_derive_seed(cfg.seed))
        num_classes = int(shard.y.max()) + 1
        device = device or cfg.client.device
        missing = _has_missing(train, val)
        missing = missing or (test is not None and _has_missing(test))
        return cls(
            cfg, None, train, val, shard.x.shape[1:], num_classes, device, missing,
            name or "site", test,
        )  # fmt: skip

    def model(self, arrays: ArrayRecord, config: ConfigRecord) -> torch.nn.Module:
        """The configured model holding the received global weights. Its output size is
        the server's "num-classes" (a site may not hold every class), else the job's.
        When the message carries the run's standardisation, the model applies it (and
        imputes missing values) to this site's raw rows; without one, rows with missing
        values are refused."""
        num_classes = int(config.get(NUM_CLASSES_KEY, self.num_classes))
        if self.num_classes > num_classes:
            raise FedmlError(
                f"This site's labels go up to {self.num_classes - 1} but the run has "
                f"{num_classes} classes (0 .. {num_classes - 1}). Labels must be class "
                "indices numbered as in the server's test set."
            )
        model = model_for(self.cfg, self.input_shape, num_classes)
        _check_fits(model, arrays, self.input_shape)
        model.load_state_dict(to_state_dict(arrays), strict=True)
        standardization = Standardization.from_config(config)
        if standardization is not None:
            features = math.prod(self.input_shape)
            if standardization.num_features != features:
                raise FedmlError(
                    f"The run standardises {standardization.num_features} features but this "
                    f"site's examples have {features}. Every site's file needs the features "
                    "of the server's test set, in the same order."
                )
            return with_standardization(model, standardization)
        if self.has_missing:
            raise FedmlError(
                "This site's data has missing values (NaN), and the run does not impute "
                "them: the server runs with data.preprocess = 'none' (or under secure "
                "aggregation). Fill them at the site, or run with data.preprocess = 'auto'."
            )
        return model

    def settings(self, config: ConfigRecord) -> TrainSettings:
        """Training settings: the message's config over the run config's defaults."""
        defaults = TrainSettings.for_round(self.cfg.client, self.cfg.client.lr)
        return TrainSettings.from_record(config, defaults)


def _check_fits(model: torch.nn.Module, arrays: ArrayRecord, input_shape: tuple[int, ...]) -> None:
    """One clear error when the server's model does not fit this site's data (another
    number of features, another image size): the first layer that differs, and the fix."""
    local = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    for key, array in arrays.items():
        if key in local and tuple(array.shape) != local[key]:
            raise FedmlError(
                f"The run's model does not fit this site's data: its {key} has shape "
                f"{tuple(array.shape)}, but this site's examples of shape {input_shape} "
                f"make it {local[key]}. Every site's file needs the features of the "
                "server's test set, in the same order and preprocessed the same way."
            )


@lru_cache(maxsize=8)
def _run_config(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    """Parse (and validate) the flat run config once per process, not once per message."""
    return RunConfig.from_run_config(dict(items))[0]


@lru_cache(maxsize=256)
def _local_job(run_config: tuple[tuple[str, Any], ...], pid: int, partitions: int) -> LocalJob:
    """Jobs of the most recently served nodes, so a virtual client's shard is not
    re-materialised every round (bounded: memory stays below 256 shards).

    A simulated node holds partition `pid` of `partitions` (its node config's
    `num-partitions`, Flower's convention), which fedml's engines set to
    `simulation.clients`. Under a plain `flwr run` the federation decides (Flower's
    local simulation starts 2 SuperNodes): the data is split that many ways, as
    `fedml simulate --clients N` would, and the difference is said once."""
    cfg = _run_config(run_config)
    if partitions and partitions != cfg.simulation.clients:
        _say_partitions(partitions, cfg.simulation.clients)
        cfg = dataclasses.replace(
            cfg, simulation=dataclasses.replace(cfg.simulation, clients=partitions)
        )
    return LocalJob.load(cfg, pid)


@lru_cache(maxsize=1)
def _say_partitions(partitions: int, clients: int) -> None:
    log.warning(
        "the federation runs %d simulated nodes (node config num-partitions) while "
        "simulation.clients is %d: the data is split %d ways, one partition per node",
        partitions,
        clients,
        partitions,
    )


@lru_cache(maxsize=4)
def _site_job(
    run_config: tuple[tuple[str, Any], ...],
    path: str,
    device: str,
    label_column: str,
    name: str,
    test_path: str,
) -> LocalJob:
    return LocalJob.load_site(
        _run_config(run_config),
        Path(path),
        device,
        label_column,
        name,
        Path(test_path) if test_path else None,
    )


def _site_rows(path: Path, label_column: str) -> Shard:
    """A site's rows: the folder `fedml client` prepared (memory-mapped), or the site's
    own file (read every time: a plain `flower-supernode --node-config 'data-path=...'`
    works, just slower)."""
    return load_prepared(path) if (path / X_FILE).is_file() else read_site_data(path, label_column)


def _has_missing(*shards: Shard) -> bool:
    return any(bool(np.isnan(shard.x).any()) for shard in shards if shard.x.dtype.kind == "f")


def _derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on the local shard; reply with the new weights."""
    job = LocalJob.from_context(context)
    config = msg.content.config_records.get("config", ConfigRecord())
    model = job.model(msg.content["arrays"], config)
    device = resolve_device(job.device)
    server_round = int(config.get(SERVER_ROUND_KEY, 0))
    seed = (  # simulated clients follow the run seed; a data site draws from OS entropy
        _derive_seed(job.cfg.seed, server_round, job.partition_id)
        if job.partition_id is not None
        else secrets.randbits(63)
    )
    settings = job.settings(config)
    received = msg.content["arrays"]
    head = personal.head_names(model) if job.cfg.client.personal == personal.FEDPER else []
    if head:  # FedPer: the shared body trains under this site's own head
        own_head = personal.load(context, job.cfg)
        if own_head is not None:
            personal.apply(model, own_head)
    privacy: dict[str, float] = {}
    if job.cfg.dp.mode == "sample":
        from clients.privacy import PrivacyBudgetExhausted

        try:
            result, privacy = _train_private(
                job, context, model, settings, device, server_round, seed
            )
        except PrivacyBudgetExhausted as exc:
            return Message(Error(code=DECLINED_CODE, reason=str(exc)), reply_to=msg)
    else:
        generator = torch.Generator().manual_seed(seed)
        control = msg.content.array_records.get(CONTROL_RECORD)  # SCAFFOLD's c
        if control is not None and job.cfg.strategy.name.lower() != "scaffold":
            raise FedmlError(
                f"The message carries SCAFFOLD's control variate, but the run's strategy is "
                f"{job.cfg.strategy.name!r}: this site trains only as the run config says."
            )
        mine = scaffold.site_control(context, job.cfg, control, server_round) if control else {}
        corrections = scaffold.corrections(model, control, mine) if control else None
        result = train_local(model, job.train, settings, device, generator, corrections=corrections)
        if control:  # c_i+ stays here
            after = scaffold.next_control(mine, control, received, model, result.steps, settings.lr)
            scaffold.keep(context, job.cfg, server_round, mine, after)
    trained = from_state_dict(model.state_dict())
    if head:  # the site keeps its head; the reply carries the head it received
        personal.save(context, job.cfg, {name: model.state_dict()[name] for name in head})
        trained = personal.keep_shared_head(trained, received, head)
    if job.cfg.client.personal == personal.DITTO:
        _train_ditto(job, context, received, config, settings, device, server_round)
    if wire.ROUND in msg.content.config_records:  # a secure round: only the masked update
        content = secagg.masked_update(
            msg,
            context,
            job.cfg,
            trained={k: to_numpy(a) for k, a in trained.items()},
            reference={k: to_numpy(a) for k, a in received.items()},
            num_examples=result.num_examples,
            metrics={"loss": result.loss},
            rng=np.random.default_rng(seed),
        )
        content["metrics"] = MetricRecord(privacy)
    else:
        metrics = {"loss": result.loss, "num-examples": result.num_examples, **privacy}
        content = RecordDict({"arrays": trained, "metrics": MetricRecord(metrics)})
    content[DEVICE_RECORD] = device_record(device)
    return Message(content=content, reply_to=msg)


def _train_ditto(
    job: LocalJob,
    context: Context,
    received: ArrayRecord,
    config: ConfigRecord,
    settings: TrainSettings,
    device: torch.device,
    server_round: int,
) -> None:
    """Ditto's personal step: the site's personal model (the global one the first time)
    trains on its rows towards the round's global model, and stays here."""
    anchor = job.model(received, config)
    mine = job.model(received, config)
    stored = personal.load(context, job.cfg)
    if stored is not None:
        personal.apply(mine, stored)
    pulled = dataclasses.replace(settings, proximal_mu=job.cfg.client.ditto_lambda)
    generator = torch.Generator().manual_seed(_personal_seed(job, server_round))
    train_local(mine, job.train, pulled, device, generator, anchor=anchor)
    personal.save(context, job.cfg, mine.state_dict())


def _personal_seed(job: LocalJob, server_round: int) -> int:
    """Simulated clients follow the run seed; a data site draws from OS entropy."""
    if job.partition_id is None:
        return secrets.randbits(63)
    return _derive_seed(job.cfg.seed, server_round, job.partition_id, PERSONAL_STREAM)


def _personal_model(
    job: LocalJob, context: Context, arrays: ArrayRecord, config: ConfigRecord
) -> torch.nn.Module | None:
    """The site's kept personal model (Ditto's, or the global body under its FedPer
    head); None before the site first trained."""
    stored = personal.load(context, job.cfg)
    if stored is None:
        return None
    return personal.apply(job.model(arrays, config), stored)


@app.train(wire.KEYS_ACTION)
def secagg_advertise(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 1 (clients/secagg.py)."""
    job = LocalJob.from_context(context)
    return secagg.advertise(msg, context, job.cfg, job.partition_id)


@app.train(wire.SHARE_ACTION)
def secagg_share(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 2 (clients/secagg.py)."""
    return secagg.share(msg, context)


@app.train(wire.UNMASK_ACTION)
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 4 (clients/secagg.py)."""
    return secagg.unmask(msg, context)


def device_record(device: torch.device) -> ConfigRecord:
    """Where this client trained: the device, and the GPU's name on CUDA."""
    record = ConfigRecord({"device": str(device)})
    if device.type == "cuda":
        record["name"] = torch.cuda.get_device_name(device)
    return record


def _train_private(
    job: LocalJob,
    context: Context,
    model: torch.nn.Module,
    settings: TrainSettings,
    device: torch.device,
    server_round: int,
    seed: int,
) -> tuple[TrainResult, dict[str, float]]:
    """DP-SGD for one round against the node's privacy ledger, which is updated and
    saved; returns the result and the privacy metrics of the reply. Raises
    `PrivacyBudgetExhausted` (without training) when the round would exceed the budget."""
    from clients import privacy

    dp = job.cfg.dp
    ledger = privacy.load_ledger(context, job.cfg)
    plan = plan_round(dp, ledger, len(job.train), settings, job.cfg.rounds)
    privacy.check_budget(dp, plan, server_round)
    # Reproducible noise only for simulated nodes; a real site draws from OS entropy.
    noise_seed = seed if PARTITION_KEY in context.node_config else None
    result, history = privacy.train_private(
        model,
        job.train,
        settings,
        device,
        plan,
        dp.max_grad_norm,
        noise_seed,
        grad_sample_mode=dp.grad_sample_mode,
    )
    ledger = PrivacyLedger(history, [*ledger.rounds, server_round], plan.noise_multiplier)
    privacy.save_ledger(context, job.cfg, ledger)
    # the plan's projection when Opacus recorded what was planned (a cache hit)
    epsilon = ledger.epsilon(dp.accountant, plan.delta)
    return result, {EPSILON_KEY: epsilon, DELTA_KEY: plan.delta}


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the local validation split (the metrics
    the strategy aggregates) and, where the site holds test rows of its own, on those
    too (the "site" record, with the site's name). Two-class tasks add the clinical
    metrics of `fedml.metrics`."""
    job = LocalJob.from_context(context)
    config = msg.content.config_records.get("config", ConfigRecord())
    model = job.model(msg.content["arrays"], config)
    device = resolve_device(job.device)
    content = RecordDict({"metrics": MetricRecord(evaluation_metrics(model, job.val, device))})
    site = ConfigRecord({"name": job.site_name})
    site.update(_own_test_metrics(job, model, device, TEST_PREFIX))
    # at most what the run config asks for (none under DP-SGD: it would train without it)
    epochs = min(int(config.get(FINE_TUNE_KEY, 0)), job.cfg.client.fine_tune_epochs)
    mine = None
    if epochs > 0:  # a personal model: the global one fine-tuned here, never sent
        mine = job.model(msg.content["arrays"], config)
        settings = dataclasses.replace(job.settings(config), local_epochs=epochs, proximal_mu=0.0)
        seed = _personal_seed(job, int(config.get(SERVER_ROUND_KEY, 0)))
        train_local(mine, job.train, settings, device, torch.Generator().manual_seed(seed))
    elif job.cfg.client.personal != "none":  # the personal model this site keeps
        mine = _personal_model(job, context, msg.content["arrays"], config)
    if mine is not None:
        validated = evaluation_metrics(mine, job.val, device)
        site.update({f"{PERSONAL_PREFIX}{key}": value for key, value in validated.items()})
        site.update(_own_test_metrics(job, mine, device, PERSONAL_PREFIX + TEST_PREFIX))
    content[SITE_RECORD] = site
    return Message(content=content, reply_to=msg)


def _own_test_metrics(
    job: LocalJob, model: torch.nn.Module, device: torch.device, prefix: str
) -> dict[str, float]:
    """`model`'s metrics on the site's own test rows, under `prefix` (none without)."""
    if job.test is None or not len(job.test):
        return {}
    return {
        f"{prefix}{key}": value
        for key, value in evaluation_metrics(model, job.test, device).items()
    }


@app.query(STATS_ACTION)
def feature_stats(msg: Message, context: Context) -> Message:
    """This node's feature statistics over its training rows (counts, sums and sums of
    squares per feature: never a row), for the run's federated standardisation; under
    secure aggregation only masked, in fixed point (`fedml.secagg.fixed_point`)."""
    job = LocalJob.from_context(context)
    config = msg.content.config_records.get("config", ConfigRecord())
    shift = None
    if SHIFT_KEY in config:
        shift = np.asarray(config[SHIFT_KEY], dtype=np.float64)
        if shift.shape != (math.prod(job.input_shape),) or not np.isfinite(shift).all():
            raise FedmlError(
                f"The run's feature statistics are taken around {shift.size} values, but "
                f"this site's examples have {math.prod(job.input_shape)} features: every "
                "site's file needs the features of the server's test set, in its order."
            )
    stats = FeatureStats.of_rows(job.train.x, shift)
    if wire.ROUND in msg.content.config_records:  # secure aggregation: only the masked sums
        units = list(config.get(SECURE_UNITS_KEY, []))  # type: ignore[arg-type]
        limit = int(config.get(SECURE_LIMIT_KEY, 0))  # type: ignore[arg-type]
        plan = np.asarray(units, dtype=np.float64)
        try:
            fixed_point.check_plan(plan, limit, counts=1 + stats.num_features)
        except ValueError as exc:
            raise FedmlError(f"Refusing the secure statistics query: {exc}.") from exc
        try:
            vector = fixed_point.encode(stats.to_vector(), plan, limit)
        except ValueError as exc:
            raise FedmlError(
                f"This site's feature statistics do not fit secure aggregation's fixed "
                f"point ({exc}): a feature lies far from the server's test set. Check this "
                "site's units and columns against the server's test set."
            ) from exc
        binding = fixed_point.binding(units, limit, list(config.get(SHIFT_KEY, [])))
        return Message(secagg.masked_input(msg, context, vector, binding), reply_to=msg)
    return Message(RecordDict({"metrics": MetricRecord(stats.to_metrics())}), reply_to=msg)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Which simulated client this node is (its node config's partition-id): the Ray
    engine numbers nodes by it, so both engines sample the same clients."""
    if PARTITION_KEY not in context.node_config:
        raise ValueError("this node is not a simulated client: its node config has no partition-id")
    pid = int(context.node_config[PARTITION_KEY])
    return Message(RecordDict({"metrics": MetricRecord({PARTITION_KEY: pid})}), reply_to=msg)
