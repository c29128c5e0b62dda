"""A history row as flat scalar series: the one per-round record that the report's
plots and CSV files and the experiment trackers (TensorBoard, MLflow) all read.

A history row nests its numbers by source (`{"server": {"accuracy": 0.9}, ...}`);
`flatten` turns it into `{"server/accuracy": 0.9, ...}`, one key per series. The
slash groups related series in TensorBoard and MLflow, and names a column in CSV.
Non-numbers (the stop reason, the names of retries) are not series and are left out.
"""

from __future__ import annotations

import math
from typing import Any, TypedDict


class ClientCounts(TypedDict):
    """What became of a round's sampled clients (a history row's "clients")."""

    sampled: int
    dropped: int  # simulated dropout: never asked
    replied: int
    failed: int
    declined: int  # refused to train: its privacy budget is spent
    timed_out: int
    rejected: int  # screened out (see "rejected" for the reasons)
    stragglers: int
    aggregated: int


class HistoryRow(TypedDict, total=False):
    """One committed round: a line of `history.jsonl`, what `on_round` callbacks, the
    report, `fedml runs` and the trackers read. Written by the round loop
    (`fedml.server`); a row read back from disk is the same dict, parsed from JSON.
    The row of a round without a new model (skipped, or stopped before it aggregated)
    holds round, lr, mu, clients, rejected, failed_reasons, retries, discarded, seconds and
    stop only."""

    round: int
    lr: float  # the clients' learning rate this round
    mu: float  # FedProx's proximal weight (a `Proximal` strategy only)
    train: dict[str, float] | None  # aggregated train metrics + "num-examples"
    clients: ClientCounts
    rejected: dict[str, int]  # screening: reason -> replies
    failed_reasons: dict[str, int]  # failed replies by the reason their site gave
    weights_capped: int  # replies whose num-examples claim was capped
    devices: dict[str, int]  # where the replies trained: device label -> replies
    secagg: dict[str, float | int]  # a secure round: sampled, shared, unmasked, dropped, ...
    preprocess: dict[str, int]  # first row: features standardised, from how many sites and rows
    evaluate: dict[str, float] | None  # federated evaluation (+ "num-examples")
    evaluate_median: dict[str, float]  # each evaluation metric's median over the sites
    sites: dict[str, dict[str, dict[str, float]]]  # site -> "validation"/"test" -> metrics
    server: dict[str, float] | None  # centralised evaluation on the server's test set
    evaluate_rejected: dict[str, int]
    evaluate_weights_capped: int
    privacy: dict[str, Any]  # the privacy report (epsilon, delta, level, ...)
    retries: list[str]  # why earlier attempts of this round were retried
    discarded: str | None  # why the round was skipped or stopped without a model
    seconds: float  # wall-clock time of the round (summed for the time budget)
    stop: str  # the stop reason, on the run's last row


# Keys that identify a row rather than measure it, "failed_reasons", whose keys are
# texts sent by sites (counted in "clients/failed" already; not a column per reason), and
# "preprocess", said once per run.
NOT_SERIES = frozenset({"round", "failed_reasons", "preprocess"})

# The series the report plots, and how a legend names them.
SERVER_ACCURACY = "server/accuracy"
SERVER_LOSS = "server/loss"
FEDERATED_ACCURACY = "evaluate/accuracy"
FEDERATED_LOSS = "evaluate/loss"
TRAIN_LOSS = "train/loss"
EPSILON_MAX = "privacy/epsilon_max"
EPSILON_MEAN = "privacy/epsilon_mean"
SECONDS = "seconds"

# A train reply's ConfigRecord naming where the client trained ("device": "cpu" or
# "cuda:N", "name": the GPU's name); a history row counts the replies per device under
# "devices" (series `devices/<device>`).
DEVICE_RECORD = "device"
# An evaluate reply's ConfigRecord naming the site ("name") and, where the site holds
# test rows of its own, the global model's metrics on them ("test-accuracy", ...); a
# history row gathers them per site under "sites".
SITE_RECORD = "site"
TEST_PREFIX = "test-"
PERSONAL_PREFIX = "personal-"  # the site's personal model's metrics ("personal-test-...")


def describe_secagg(entry: dict[str, Any]) -> str:
    """A secure round's "secagg" entry in words: how many updates were masked and
    whether the server could unmask their sum (it never sees one update)."""
    unmasked, dropped = int(entry.get("unmasked", 0)), int(entry.get("dropped", 0))
    if unmasked == 0:
        return "secure aggregation: no sum unmasked this round"
    text = f"secure aggregation: {unmasked} updates masked, only their sum unmasked"
    notes = [f"{dropped} dropped out"] if dropped else []
    if entry.get("excluded"):
        notes.append(f"{int(entry['excluded'])} left out as hostile")
    return text + (f" ({', '.join(notes)})" if notes else "")


def masked_updates(rows: list[HistoryRow]) -> int:
    """How many site updates reached the server only masked, over `rows`."""
    return sum(int(row["secagg"].get("unmasked", 0)) for row in rows if row.get("secagg"))


def secure_text(rows: list[HistoryRow]) -> str:
    """What secure aggregation did over a run's secure rounds, for a summary."""
    return (
        f"on: {masked_updates(rows)} site updates reached the server only masked, over "
        f"{len(rows)} rounds; the server unmasked sums only"
    )


def site_accuracies(row: HistoryRow) -> tuple[str, dict[str, float]]:
    """Each site's accuracy in `row` ("sites"): on its own test rows when every site
    reported some ("test"), else on its validation rows ("validation"); empty when the
    row has no per-site results."""
    sites = row.get("sites") or {}
    split = "test" if sites and all("test" in s for s in sites.values()) else "validation"
    found = {
        name: float(entry[split]["accuracy"])
        for name, entry in sites.items()
        if "accuracy" in entry.get(split, {})
    }
    return split, found


def describe_sites(row: HistoryRow) -> str:
    """The per-site results of `row` in words: the sites' mean accuracy and the worst."""
    split, accuracies = site_accuracies(row)
    if not accuracies:
        return ""
    worst = min(accuracies, key=lambda name: accuracies[name])
    mean = sum(accuracies.values()) / len(accuracies)
    rows = "own test rows" if split == "test" else "validation rows"
    text = (
        f"{len(accuracies)} sites on their {rows}: mean accuracy {mean:.4f}, worst "
        f"{worst} {accuracies[worst]:.4f}"
    )
    personal = [
        entry["personal"][split]["accuracy"]
        for entry in (row.get("sites") or {}).values()
        if "accuracy" in entry.get("personal", {}).get(split, {})
    ]
    if len(personal) == len(accuracies):
        text += f"; personal models: mean {sum(personal) / len(personal):.4f}"
    return text


def device_label(record: dict[str, Any]) -> str:
    """How a history row names a device record: `cpu`, or `cuda:0 NVIDIA H100 ...`."""
    return " ".join(str(record[k]) for k in ("device", "name") if record.get(k))


def flatten(row: HistoryRow) -> dict[str, float]:
    """Every finite number in `row` under its slash-joined path, except the round.

    Booleans are left out (they are flags, not measurements); so are NaN and
    infinities, which neither a CSV reader nor a tracker handles alike.
    """
    flat: dict[str, float] = {}
    _collect({k: v for k, v in row.items() if k not in NOT_SERIES}, "", flat)
    return flat


def _collect(node: dict[str, Any], path: str, flat: dict[str, float]) -> None:
    for key in sorted(node):
        value, name = node[key], f"{path}{key}"
        if isinstance(value, dict):
            _collect(value, f"{name}/", flat)
        elif _is_number(value) and math.isfinite(value):
            flat[name] = value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
