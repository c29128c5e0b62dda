"""The server's audit trail of a run: who joined, who refused or failed and why, and
what each round committed.

`RUN_DIR/audit.jsonl` is the same chained, fsynced trail a data site keeps (`fedml.audit`;
`fedml audit verify RUN_DIR` checks it). Its events:

- "start" or "resume": the experiment (its digest, as sites file their ledgers under
  it), the round it starts after, the planned rounds, the DP mode and secure
  aggregation;
- "join" / "left": nodes that appeared or went away since the last round (node IDs; a
  site's name comes with its evaluation replies);
- "failures": a round's replies that brought no update, by the reason their site gave
  (a site's refusal names its policy's rule), and how many declined (privacy budget);
- "commit": the round, a SHA-256 of the global model it committed (fedml.audit's
  `arrays_digest`), how many updates it aggregated, its metrics and privacy entry, and
  why it was discarded or the run stopped.

A trail that cannot be written stops the run: a server that promises an audit trail
does not go on without one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from fedml import audit
from fedml.config import RunConfig, experiment_digest
from fedml.records import HistoryRow

MAX_NODES = 1000  # node IDs written per join or leave event (a simulation has many)
METRIC_KEYS = ("train", "evaluate", "server", "privacy")


class RunTrail:
    """Appends a run's events to its directory's audit trail."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.nodes: set[int] = set()

    def started(self, cfg: RunConfig, after_round: int, resumed: bool) -> None:
        audit.append(
            self.folder,
            {
                "event": "resume" if resumed else "start",
                "experiment": experiment_digest(cfg),
                "after_round": after_round,
                "rounds": cfg.rounds,
                "dp": cfg.dp.mode,
                "secagg": cfg.secagg.enabled,
            },
        )

    def seen(self, node_ids: Iterable[int]) -> None:
        """Note which nodes the grid has now: those new since the last look joined,
        those gone left."""
        now = set(node_ids)
        for event, nodes in (("join", now - self.nodes), ("left", self.nodes - now)):
            if nodes:
                shown = sorted(nodes)
                audit.append(
                    self.folder, {"event": event, "count": len(shown), "nodes": shown[:MAX_NODES]}
                )
        self.nodes = now

    def committed(self, row: HistoryRow, arrays: ArrayRecord, stop_reason: str | None) -> None:
        """The round's failures (when any) and its commit."""
        failed = dict(row.get("failed_reasons", {}))
        declined = int(row.get("clients", {}).get("declined", 0))
        if failed or declined:
            audit.append(
                self.folder,
                {
                    "event": "failures",
                    "round": row["round"],
                    "reasons": failed,
                    "declined": declined,
                },
            )
        event: dict[str, Any] = {
            "event": "commit",
            "round": row["round"],
            "model": audit.arrays_digest(arrays),
            "aggregated": int(row.get("clients", {}).get("aggregated", 0)),
        }
        for key in METRIC_KEYS:
            if isinstance(row.get(key), dict):
                event[key] = _finite(row[key])
        if row.get("discarded"):
            event["discarded"] = str(row["discarded"])
        if stop_reason:
            event["stop"] = stop_reason
        audit.append(self.folder, event)


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    """The entry's JSON-safe values (a diverged loss is NaN, which JSON cannot hold)."""
    kept: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, bool | str | int) or (
            isinstance(value, float) and math.isfinite(value)
        ):
            kept[str(key)] = value
    return kept


def describe(entry: dict[str, Any]) -> str:
    """A run trail's entry in words, for `fedml audit show`."""
    event = entry.get("event")
    if event in ("start", "resume"):
        return (
            f"experiment {entry.get('experiment')}, after round {entry.get('after_round')} "
            f"of {entry.get('rounds')}, dp {entry.get('dp')}, secagg {entry.get('secagg')}"
        )
    if event in ("join", "left"):
        nodes = ", ".join(str(n) for n in entry.get("nodes", [])[:10])
        more = " ..." if entry.get("count", 0) > 10 else ""
        return f"{entry.get('count')} node(s): {nodes}{more}"
    if event == "failures":
        reasons = "; ".join(f"{n} x {why}" for why, n in entry.get("reasons", {}).items())
        declined = entry.get("declined", 0)
        return reasons + (f"; {declined} declined (privacy budget)" if declined else "")
    if event == "commit":
        parts = [f"model {str(entry.get('model'))[:16]}", f"{entry.get('aggregated')} aggregated"]
        for source in ("evaluate", "server"):
            accuracy = (entry.get(source) or {}).get("accuracy")
            if accuracy is not None:
                parts.append(f"{source} accuracy {accuracy:.4g}")
        for key in ("discarded", "stop"):
            if entry.get(key):
                parts.append(f"{key}: {entry[key]}")
        return ", ".join(parts)
    return str(event)
