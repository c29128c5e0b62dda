"""A data site's policy and privacy ledger, applied to one task before any data is read.

`fedml client --policy FILE` names the site's policy in the node config (`POLICY_KEY`,
re-read for every task: an edited policy applies to the next task, and a broken one
refuses every task until it is fixed), and the number of rows it prepared (`ROWS_KEY`).
For each task the site's executor calls `judged` (fedml.deploy.site_task), which reads
only the run config, the message's config, the policy and the site's ledger file, and
says which rule the task breaks (fedml.site_policy), if any.

A DP-SGD training round is planned here exactly as the ClientApp will run it
(`fedml.privacy_ledger.plan_round`, the same function, on the same training rows), and
its epsilon is computed by the site, with Opacus's RDP accountant, from the settings the
site will apply, never from figures the server sends: for this experiment and over the
site's lifetime, at the site's delta (the policy's `max_delta`, else fedml's default for
its rows). While a DP training task runs, from this judgement to the ledger's update,
the site holds its ledger's lock, so tasks of two runs cannot both spend the budget's
last part. What the task spent goes into the site's audit trail (`Judgement.spent`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message

from fedml.config import RunConfig, experiment_digest
from fedml.data.datasets import validation_size
from fedml.data.features import STATS_ACTION
from fedml.deploy.site_audit import SERVER_CERTIFICATE_KEY
from fedml.errors import FedmlError
from fedml.privacy import default_delta, epsilon_of
from fedml.privacy_ledger import SiteLedger, locked, plan_round
from fedml.secagg import messages as wire
from fedml.settings import CONTROL_RECORD, FINE_TUNE_KEY, SERVER_ROUND_KEY, TrainSettings
from fedml.site_policy import (
    SitePolicy,
    TaskFacts,
    load_policy,
    privacy_refusal,
    refusal,
)

POLICY_KEY = "policy"  # node config: the site's policy file
ROWS_KEY = "data-rows"  # node config: how many rows the site prepared
LEDGER_KEY = "privacy-ledger"  # node config: the site's ledger file (clients.privacy)
SITE_ACCOUNTANT = "rdp"  # the site's own budgets: Opacus's RDP accountant

log = logging.getLogger("fedml.site")


@dataclass
class Judgement:
    """What the site's rules say of one task."""

    refusal: str | None = None
    ledger: Path | None = None  # the site's ledger, for a DP-SGD training round
    experiment: str = ""
    site_delta: float = 0.0
    total_before: float = 0.0

    def spent(self) -> dict[str, float] | None:
        """After the task: the epsilon it spent and the site's epsilons now (this
        experiment, lifetime), at the site's delta; None for a task without DP-SGD."""
        if self.ledger is None:
            return None
        try:
            site = SiteLedger.load(self.ledger)
        except FedmlError:  # damaged since the judgement: the task's entry says so
            log.exception("the site's ledger cannot be read after the task")
            return {"ledger_unreadable": 1.0}
        total = _epsilon(site.lifetime(), self.site_delta)
        return {
            "epsilon_task": max(0.0, total - self.total_before),
            "epsilon_run": _epsilon(tuple(site.run(self.experiment).history), self.site_delta),
            "epsilon_total": total,
            "delta": self.site_delta,
        }


@contextmanager
def judged(message: Message, context: Context) -> Iterator[Judgement]:
    """Judge the task; for a DP-SGD training round, hold the site's ledger lock until
    the `with` block (the task) ends."""
    ledger = _ledger_path(context)
    private = (
        _kind(message) == "train"
        and str(context.run_config.get("dp.mode", "")) == "sample"
        and ledger is not None
    )
    with locked(ledger) if private and ledger is not None else nullcontext():
        yield judge(message, context)


def judge(message: Message, context: Context) -> Judgement:
    """The rules' verdict on the task (the caller holds the ledger's lock). Whatever a
    hostile task makes go wrong here is a refusal, never an exception."""
    try:
        return _judge(message, context)
    except Exception as exc:  # a value no rule foresaw: refuse, and say what it was
        return Judgement(
            f"refused: the site cannot judge this task ({type(exc).__name__}: {exc})"[:500]
        )


def _judge(message: Message, context: Context) -> Judgement:
    node = context.node_config
    kind = _kind(message)
    if kind == "unknown":
        return Judgement(
            f"refused: this site serves no message of type {message.metadata.message_type!r}"
        )
    if (
        message.has_content()
        and "config" in message.content
        and ("config" not in message.content.config_records)
    ):
        return Judgement("refused: the message's 'config' is not a ConfigRecord")
    policy = None
    if node.get(POLICY_KEY):
        try:
            policy = load_policy(Path(str(node[POLICY_KEY])))
        except FedmlError as exc:  # fail closed: a broken policy allows nothing
            return Judgement(f"refused: the site's policy cannot be read ({exc})")
    try:
        cfg = RunConfig.from_run_config(dict(context.run_config))[0]
    except (FedmlError, ValueError, TypeError) as exc:
        return Judgement(f"refused: the run's config is not valid ({exc})"[:500])
    config = _message_config(message)
    try:
        settings = TrainSettings.from_record(
            config, TrainSettings.for_round(cfg.client, cfg.client.lr)
        )
    except (ValueError, TypeError) as exc:
        return Judgement(f"refused: the message's settings are not valid ({exc})"[:500])
    rows = _train_rows(node.get(ROWS_KEY), cfg)
    if policy is not None:
        pinned = policy.server.certificate_sha256
        if pinned and node.get(SERVER_CERTIFICATE_KEY) != pinned:
            return Judgement(
                "refused by the site's policy (server.certificate_sha256): this site joined "
                f"a SuperLink whose certificate is {node.get(SERVER_CERTIFICATE_KEY) or 'none'}, "
                f"not {pinned}; restart fedml client to check it again"
            )
        if kind == "train" and (rows is None or settings.batch_size < 1):
            return Judgement(
                "refused: the site cannot judge this round (no row count in its node config: "
                "restart it with fedml client, or the batch size is below 1)"
            )
        why = refusal(policy, _facts(kind, cfg, config, settings, message, rows or 0))
        if why is not None:
            return Judgement(why)
    ledger = _ledger_path(context)
    if kind != "train" or cfg.dp.mode != "sample" or ledger is None or rows is None:
        return Judgement()
    return _judge_private(policy or SitePolicy(), cfg, settings, ledger, rows)


def _judge_private(
    policy: SitePolicy, cfg: RunConfig, settings: TrainSettings, path: Path, rows: int
) -> Judgement:
    """Plan the DP-SGD round as the ClientApp will, and judge it by the site's ledger."""
    site = SiteLedger.load(path)
    experiment = experiment_digest(cfg)
    run = site.run(experiment)
    try:
        plan = plan_round(cfg.dp, run, rows, settings, cfg.rounds)
    except FedmlError as exc:
        return Judgement(f"refused: the run's DP-SGD cannot be planned ({exc})")
    site_delta = policy.privacy.max_delta or default_delta(rows)
    total_before = _epsilon(site.lifetime(), site_delta)
    why = privacy_refusal(
        policy,
        plan.noise_multiplier,
        plan.delta,
        (_epsilon(tuple(run.history), site_delta), _epsilon(plan.history_after, site_delta)),
        (total_before, _epsilon(site.lifetime(experiment, plan.history_after), site_delta)),
        site_delta,
    )
    return Judgement(why, path, experiment, site_delta, total_before)


def _facts(
    kind: str,
    cfg: RunConfig,
    config: ConfigRecord,
    settings: TrainSettings,
    message: Message,
    rows: int,
) -> TaskFacts:
    epochs, work = settings.local_epochs, f"{settings.local_epochs} epochs"
    if kind == "evaluate":  # fine-tuning a personal model, as much as the ClientApp will
        epochs = min(_int(config.get(FINE_TUNE_KEY, 0)), cfg.client.fine_tune_epochs)
        work = f"{epochs} epochs of fine-tuning"
    elif settings.local_steps > 0 and cfg.dp.mode != "sample":  # DP-SGD trains in epochs
        per_epoch = math.ceil(rows / settings.batch_size) if settings.batch_size > 0 else 1
        epochs = math.ceil(settings.local_steps / max(per_epoch, 1))
        work = f"{settings.local_steps} steps ({epochs} epochs of this site's rows)"
    implied = []  # what the message's training amounts to, whatever the run's name says
    if message.has_content() and CONTROL_RECORD in message.content.array_records:
        implied.append("scaffold")
    if kind == "train" and settings.proximal_mu > 0 and cfg.strategy.name != "fedprox":
        implied.append("fedprox")
    return TaskFacts(
        kind=kind,
        model=cfg.model.name,
        strategy=cfg.strategy.name,
        rounds=cfg.rounds,
        server_round=_int(config.get(SERVER_ROUND_KEY, 0)),
        dp_mode=cfg.dp.mode,
        secagg=cfg.secagg.enabled,
        masked=message.has_content() and wire.ROUND in message.content.config_records,
        implied=tuple(implied),
        epochs=epochs,
        work=work,
        batch_size=settings.batch_size,
    )


KINDS = {  # every message type fedml's ClientApp serves, as the site judges it
    "train": "train",
    "train.default": "train",  # Flower's name for the default handler: training too
    **{f"train.{a}": "step" for a in (wire.KEYS_ACTION, wire.SHARE_ACTION, wire.UNMASK_ACTION)},
    "evaluate": "evaluate",
    "evaluate.default": "evaluate",
    f"query.{STATS_ACTION}": "statistics",
    "query": "other",  # a simulated client's identity (a site refuses to answer)
    "query.default": "other",
}


def _kind(message: Message) -> str:
    """How the site judges a message type (`KINDS`); "unknown" for any other, which the
    site refuses: an action it does not know might run a handler no rule was written for."""
    return KINDS.get(message.metadata.message_type, "unknown")


def _ledger_path(context: Context) -> Path | None:
    """The site's ledger file, as the ClientApp reads it (clients.privacy.ledger_path)."""
    value = context.node_config.get(LEDGER_KEY)
    return Path(str(value)).expanduser() if value else None


def _message_config(message: Message) -> ConfigRecord:
    if message.has_content():
        config = message.content.config_records.get("config")
        if config is not None:
            return config
    return ConfigRecord()


def _train_rows(value: Any, cfg: RunConfig) -> int | None:
    """The site's training rows (its prepared rows less the validation split)."""
    try:
        rows = int(value)
    except (TypeError, ValueError):
        return None
    return rows - validation_size(rows, cfg.data.val_fraction) if rows > 0 else None


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _epsilon(history: tuple[Any, ...], delta: float) -> float:
    return epsilon_of(tuple(history), SITE_ACCOUNTANT, delta)
