"""What a data site writes into its audit trail (`fedml.audit`) for every task.

One entry per task the site's executor served, accepted or not: the server that sent
it (the SuperLink's address and the SHA-256 of its TLS certificate, as `fedml client`
checked them), the run and app that asked, the message kind and round, what became of
it (done, declined, refused, failed, and why), the settings the site applied (the
message's training settings and the run's DP, secure-aggregation and client settings),
a SHA-256 of the model it received and of
the arrays it sent back, the update's norm when it sent a plain update, the metrics it
sent (its DP epsilon among them) and, for a DP-SGD round, what the site's own ledger
says it spent: this task's epsilon, this experiment's and the site's total. The trail
lives in the site's state folder (`fedml client --state-dir`), so `fedml audit verify
fedml-site-NAME` checks it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, Message

from fedml import audit
from fedml.node_state import SITE_STATE_KEY
from fedml.settings import SERVER_ROUND_KEY

log = logging.getLogger(__name__)

SERVER_KEY = "superlink"  # node config: the SuperLink's address, as the site reaches it
SERVER_CERTIFICATE_KEY = "superlink-sha256"  # node config: its TLS certificate's SHA-256
SETTINGS_PREFIXES = ("dp.", "secagg.", "client.", "strategy.name", "model.name", "data.")
MAX_METRICS = 64  # metric values written per entry (a reply holds at most this many)


def record_task(
    message: Message,
    context: Context,
    run: Any,
    reply: Message | None,
    outcome: str,
    reason: str = "",
    privacy: dict[str, float] | None = None,
) -> None:
    """Append the task's entry to the site's trail (nothing without a state folder: a
    plain `flower-supernode`). `privacy`: what a DP-SGD task spent, by the site's ledger
    (fedml.deploy.policy_check). A trail that cannot be written is logged, never raised:
    the reply has been decided already."""
    folder = context.node_config.get(SITE_STATE_KEY)
    if not folder:
        return
    event = task_event(message, context, run, reply, outcome, reason)
    if privacy is not None:
        event["privacy"] = privacy
    try:
        audit.append(Path(str(folder)), event)
    except Exception:  # a full disk, a damaged head: say so on the site's log
        log.exception("could not write the audit trail in %s", folder)


def task_event(
    message: Message,
    context: Context,
    run: Any,
    reply: Message | None,
    outcome: str,
    reason: str,
) -> dict[str, Any]:
    """The audit entry's fields for one task."""
    config = message.content.config_records.get("config") if message.has_content() else None
    received = message.content.array_records.get("arrays") if message.has_content() else None
    sent = None
    if reply is not None and reply.has_content():
        sent = next(iter(reply.content.array_records.values()), None)
    event: dict[str, Any] = {
        "event": "task",
        "run": int(getattr(run, "run_id", 0) or 0),
        "app": str(getattr(run, "fab_id", "") or ""),
        "server": {
            "address": str(context.node_config.get(SERVER_KEY, "")),
            "certificate_sha256": str(context.node_config.get(SERVER_CERTIFICATE_KEY, "")),
        },
        "message": message.metadata.message_type,
        "round": int(config.get(SERVER_ROUND_KEY, 0)) if config is not None else 0,
        "outcome": outcome,
        "settings": {
            **_scalars(dict(config) if config is not None else {}),
            **_scalars(
                {
                    k: v
                    for k, v in dict(context.run_config).items()
                    if str(k).startswith(SETTINGS_PREFIXES)
                }
            ),
        },
        "received": audit.arrays_digest(received),
        "sent": audit.arrays_digest(sent),
    }
    if reason:
        event["reason"] = reason
    norm = update_norm(received, sent)
    if norm is not None:
        event["update_norm"] = norm
    if reply is not None and reply.has_content():
        metrics = next(iter(reply.content.metric_records.values()), None)
        if metrics is not None:
            event["metrics"] = dict(list(_scalars(dict(metrics)).items())[:MAX_METRICS])
    return event


def update_norm(received: ArrayRecord | None, sent: ArrayRecord | None) -> float | None:
    """The L2 norm of sent - received over the floating arrays both hold alike (a plain update);
    None when there is no such pair (an evaluation, a masked update)."""
    if received is None or sent is None or list(received) != list(sent):
        return None
    total = 0.0
    for name in received:
        before, after = received[name].numpy(), sent[name].numpy()
        if before.shape != after.shape or not np.issubdtype(before.dtype, np.floating):
            continue
        if after.dtype != before.dtype:
            return None
        total += float(np.sum(np.square(after.astype(np.float64) - before)))
    return math.sqrt(total)


def _scalars(values: dict[str, Any]) -> dict[str, Any]:
    """The JSON scalars of `values` (finite numbers, strings, booleans), sorted by key:
    long lists (a standardisation's means) are left out."""
    kept = {}
    for key in sorted(values):
        value = values[key]
        if isinstance(value, bool | str) or (
            isinstance(value, int | float) and math.isfinite(value)
        ):
            kept[str(key)] = value
    return kept
