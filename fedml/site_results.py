"""What a round's evaluation replies say per site, and the federation's exact rates.

Every evaluation reply names its site and may carry the global model's metrics on the
site's own test rows and a fine-tuned personal model's (`clients.app.evaluate_global`,
the `SITE_RECORD`). `site_results` gathers them for the history row's "sites", screened
like any reply's metrics and under names made safe for columns and trackers;
`federated_entry` keeps the strategy's averages but replaces what must not be averaged:
the confusion rates are recomputed exactly from the sites' counts, and AUROC is left to
the sites and the server (`fedml.metrics`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from flwr.app import ConfigRecord, Message

from fedml.metrics import AUROC, COUNTS, RATES, pooled_binary
from fedml.records import PERSONAL_PREFIX, SITE_RECORD, TEST_PREFIX
from fedml.validation import MAX_METRIC_NAME, MAX_METRICS, metrics_problem

log = logging.getLogger(__name__)

MAX_SITES_IN_ROW = 100  # per-site results in a history row, for up to this many replies


def federated_entry(entry: dict[str, Any] | None, replies: list[Message]) -> dict[str, Any] | None:
    """The federated evaluation entry: the strategy's aggregate, except that confusion
    counts are not averaged (their rates are recomputed exactly from each site's counts,
    scaled to its capped weight) and AUROC is not averaged at all (it cannot be, exactly:
    see "sites" and "server")."""
    if entry is None:
        return None
    for key in (*COUNTS, *RATES, AUROC):
        entry.pop(key, None)
    return {**entry, **pooled_rates(replies)}


def pooled_rates(replies: list[Message]) -> dict[str, float]:
    """Sensitivity, specificity, balanced accuracy and F1 of the sites' rows pooled,
    from their confusion counts, each site's counts scaled to its (capped) weight."""
    scaled = []
    for reply in replies:
        metrics = next(iter(reply.content.metric_records.values()))
        counts = [float(metrics.get(key, -1)) for key in COUNTS]
        if min(counts) < 0 or sum(counts) <= 0:
            continue
        factor = float(metrics.get("num-examples", 0)) / sum(counts)
        scaled.append({key: value * factor for key, value in zip(COUNTS, counts, strict=True)})
    pooled = pooled_binary(scaled)
    return {key: value for key, value in pooled.items() if key in RATES}


def site_results(replies: list[Message]) -> dict[str, dict[str, Any]]:
    """Each site's evaluation, by the name its reply gives (`SITE_RECORD`; the node id
    where it gives none): its "validation" metrics, where it holds test rows of its own
    its "test" metrics, and with fine-tuning its "personal" model's, each screened like
    any reply's metrics (dropped when they fail).
    A name is the site's own word: made safe for history columns and trackers
    (`_site_name`), and a name already taken gets the node id added, never overwriting
    another site's entry. Left out (empty) beyond `MAX_SITES_IN_ROW` replies: per-site
    rows are for federations of institutions, not of thousands of devices."""
    if len(replies) > MAX_SITES_IN_ROW:
        return {}
    sites: dict[str, dict[str, Any]] = {}
    for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
        node = reply.metadata.src_node_id
        record = reply.content.config_records.get(SITE_RECORD, ConfigRecord())
        name = _site_name(record.get("name"), node)
        base, tries = name, 0
        while name in sites:  # each try a new name: ends within len(sites) + 1 tries
            tries += 1
            suffix = f"-node{node}" + (f"-{tries}" if tries > 1 else "")
            name = base[: MAX_METRIC_NAME - len(suffix)] + suffix
        metrics = next(iter(reply.content.metric_records.values()))
        entry: dict[str, Any] = {"validation": _numbers(dict(metrics))}
        test = _screened(name, record, TEST_PREFIX)
        if test:
            entry["test"] = test
        personal = {
            "validation": _screened(
                name, record, PERSONAL_PREFIX, but_not=PERSONAL_PREFIX + TEST_PREFIX
            ),
            "test": _screened(name, record, PERSONAL_PREFIX + TEST_PREFIX),
        }
        if any(personal.values()):
            entry["personal"] = {split: found for split, found in personal.items() if found}
        sites[name] = entry
    return dict(sorted(sites.items()))


def _screened(
    name: str, record: ConfigRecord, prefix: str, but_not: str | None = None
) -> dict[str, float]:
    """The metrics of a site's record under `prefix` (not those under `but_not`), screened
    like any reply's metrics; empty when there are none or they fail (said in the log)."""
    found = {
        key[len(prefix) :]: value
        for key, value in record.items()
        if isinstance(key, str)
        and key.startswith(prefix)
        and not (but_not and key.startswith(but_not))
    }
    if found and metrics_problem(found) is not None:
        log.warning("site %s sent %s metrics that fail screening; left out", name, prefix)
        return {}
    return _numbers(found) if found else {}


def _site_name(name: object, node: int) -> str:
    """A site's self-chosen name, made safe for history columns, CSV headers and
    trackers (MLflow refuses most punctuation): letters, digits, `_`, `-`, `.` and
    spaces, at most MAX_METRIC_NAME characters, not `.` or `..`; `node-<id>` when
    nothing is left."""
    text = "".join(c if c.isalnum() or c in "_-. " else "_" for c in str(name or ""))
    text = text.strip()[:MAX_METRIC_NAME]
    return text if text.strip(".") else f"node-{node}"


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite scalar numbers among a reply's metrics (at most MAX_METRICS)."""
    found = {
        str(k)[:MAX_METRIC_NAME]: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    return dict(sorted(found.items())[:MAX_METRICS])
