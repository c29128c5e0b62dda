"""The fedml ClientApp: local training and evaluation on a node's private shard.

Which shard a node holds comes from its Flower node config: `partition-id` (set by the
in-process engine and by Flower's Simulation Runtime) selects a client of the configured
dataset. The run config (`context.run_config`, fedml's flat RunConfig) names the dataset,
model and default training settings; each train message's "config" may override the
settings ("local-epochs", "batch-size", "lr", "optimizer", "momentum", "weight-decay",
"proximal-mu"), so a stock Flower strategy that sends only "server-round" works too.

Replies follow Flower's conventions: "arrays" (the trained state dict) and "metrics"
(`loss`, `num-examples`; evaluation adds `accuracy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.trainer import TrainSettings, evaluate, resolve_device, train_local
from fedml.arrays import from_state_dict, to_state_dict
from fedml.config import RunConfig
from fedml.data import Shard, federation_for, split_validation
from fedml.models import model_for

app = ClientApp()


@dataclass(frozen=True)
class LocalJob:
    """One node's view of the run: its data split, its model, its device."""

    cfg: RunConfig
    partition_id: int
    train: Shard
    val: Shard
    input_shape: tuple[int, ...]
    num_classes: int

    @classmethod
    def from_context(cls, context: Context) -> LocalJob:
        """The job for this node and run (kept per process: a node loads its data once)."""
        if "partition-id" not in context.node_config:
            raise ValueError("node config has no 'partition-id': this node holds no data")
        run_config = tuple(sorted(context.run_config.items()))
        return _local_job(run_config, int(context.node_config["partition-id"]))

    @classmethod
    def load(cls, cfg: RunConfig, pid: int) -> LocalJob:
        """Materialise client `pid`'s shard and split off its validation part."""
        federation = federation_for(cfg)
        train, val = split_validation(
            federation.client(pid), cfg.data.val_fraction, seed=_derive_seed(cfg.seed, pid)
        )
        return cls(cfg, pid, train, val, federation.input_shape, federation.num_classes)

    def model(self, arrays: ArrayRecord) -> torch.nn.Module:
        """The configured model holding the received global weights."""
        model = model_for(self.cfg, self.input_shape, self.num_classes)
        model.load_state_dict(to_state_dict(arrays), strict=True)
        return model

    def settings(self, config: ConfigRecord) -> TrainSettings:
        """Training settings: the message's config over the run config's defaults."""
        c = self.cfg.client
        return TrainSettings(
            epochs=int(config.get("local-epochs", c.local_epochs)),
            batch_size=int(config.get("batch-size", c.batch_size)),
            lr=float(config.get("lr", c.lr)),
            optimizer=str(config.get("optimizer", c.optimizer)),
            momentum=float(config.get("momentum", c.momentum)),
            weight_decay=float(config.get("weight-decay", c.weight_decay)),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
        )


@lru_cache(maxsize=8)
def _run_config(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    """Parse (and validate) the flat run config once per process, not once per message."""
    return RunConfig.from_flat(dict(items))


@lru_cache(maxsize=256)
def _local_job(run_config: tuple[tuple[str, Any], ...], pid: int) -> LocalJob:
    """Jobs of the most recently served nodes, so a virtual client's shard is not
    re-materialised every round (bounded: memory stays below 256 shards)."""
    return LocalJob.load(_run_config(run_config), pid)


def _derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on the local shard; reply with the new weights."""
    job = LocalJob.from_context(context)
    config = msg.content["config"]
    model = job.model(msg.content["arrays"])
    device = resolve_device(job.cfg.client.device)
    generator = torch.Generator().manual_seed(
        _derive_seed(job.cfg.seed, int(config.get("server-round", 0)), job.partition_id)
    )
    result = train_local(model, job.train, job.settings(config), device, generator)
    content = RecordDict(
        {
            "arrays": from_state_dict(model.state_dict()),
            "metrics": MetricRecord({"loss": result.loss, "num-examples": result.num_examples}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the local validation split."""
    job = LocalJob.from_context(context)
    model = job.model(msg.content["arrays"])
    loss, accuracy = evaluate(model, job.val, resolve_device(job.cfg.client.device))
    metrics = MetricRecord({"loss": loss, "accuracy": accuracy, "num-examples": len(job.val)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
