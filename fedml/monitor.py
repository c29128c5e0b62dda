"""The metric a run watches: which history value, and whether bigger is better.

A history row (see `fedml.server`) holds metric groups `server` (centralised test set),
`evaluate` (federated evaluation) and `train`. A monitored metric is named
"<group>.<metric>", e.g. "server.accuracy" or "evaluate.loss".
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

from fedml.errors import FedmlError
from fedml.metrics import AUROC, RATES
from fedml.records import HistoryRow

MONITORED_SOURCES = ("server", "evaluate", "train")
# Every metric a history row records, by source: the server's test set, federated
# evaluation (fedml's ClientApp replies loss and accuracy) and training; two-class tasks
# add the clinical metrics of `fedml.metrics` (AUROC on the server's test set only: the
# sites' AUROCs cannot be combined exactly).
RECORDED_METRICS = (
    "server.loss",
    "server.accuracy",
    *(f"server.{name}" for name in (AUROC, *RATES)),
    "evaluate.loss",
    "evaluate.accuracy",
    *(f"evaluate.{name}" for name in RATES),
    "evaluate.num-examples",
    "train.loss",
    "train.num-examples",
)
# The best model is chosen on the sites' validation rows (federated evaluation), never on
# a test set: a model picked by its test score makes that score optimistic.
AUTO_ORDER = ("evaluate.accuracy", "evaluate.loss", "train.loss")
# Early stopping's "auto" (`stop.metric`) keeps the order it always had, so a resumed run
# goes on judging by the metric its committed best was measured in.
STOP_ORDER = ("server.accuracy", "evaluate.accuracy", "train.loss")
TEST_SOURCE = "server"  # the server's rows are a test set (the pooled sites' test rows)
LOSS_ORDER = ("server.loss", "evaluate.loss", "train.loss")


@dataclass(frozen=True)
class Monitor:
    """A configured metric ("auto" resolves per row) and its direction."""

    metric: str = "auto"
    mode: str = "auto"
    auto: tuple[str, ...] = AUTO_ORDER

    def name(self, row: HistoryRow) -> str | None:
        """The metric this row is judged by (None when the row has none of them)."""
        candidates = self.auto if self.metric == "auto" else (self.metric,)
        return next((m for m in candidates if _raw(row, m) is not None), None)

    def raw(self, row: HistoryRow) -> float | None:
        """The monitored value as recorded, NaN and inf included; None when absent."""
        name = self.name(row)
        return None if name is None else _raw(row, name)

    def value(self, row: HistoryRow) -> float | None:
        """The monitored value of a history row; None when absent or not finite."""
        value = self.raw(row)
        return value if value is not None and math.isfinite(value) else None

    def maximise(self, name: str) -> bool:
        if self.mode != "auto":
            return self.mode == "max"
        return "loss" not in name.rsplit(".", 1)[-1]

    def best(self, rows: list[HistoryRow]) -> HistoryRow | None:
        """The best row (earliest on ties), judged by the first row's metric name."""
        scored = [(row, self.value(row)) for row in rows]
        scored = [(row, v) for row, v in scored if v is not None]
        if not scored:
            return None
        name = self.name(scored[0][0])
        sign = 1.0 if self.maximise(name) else -1.0
        best_row, best_value = scored[0]
        for row, value in scored[1:]:
            if self.name(row) == name and sign * value > sign * best_value:
                best_row, best_value = row, value
        return best_row


def _raw(row: HistoryRow, name: str) -> float | None:
    group, _, metric = name.partition(".")
    value = (row.get(group) or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


_COMPARISONS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_TARGET = re.compile(r"^\s*([a-z_]+\.[A-Za-z0-9_\-]+)\s*(>=|<=|>|<)\s*(\S+)\s*$")


@dataclass(frozen=True)
class Target:
    """A stop condition on one history metric, e.g. `server.accuracy >= 0.95`."""

    metric: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Target:
        """Parse "<source>.<metric> <op> <number>"; a malformed text is a user error."""
        match = _TARGET.match(text)
        number = _to_float(match.group(3)) if match else None
        if match is None or number is None:
            raise FedmlError(
                f"stop.target '{text}' is not a condition. Write '<source>.<metric> <op> "
                "<number>' with op one of >=, <=, >, <, e.g. 'server.accuracy >= 0.95'."
            )
        return cls(match.group(1), match.group(2), number)

    def reached(self, row: HistoryRow) -> bool:
        """Whether the row meets the condition. On federated evaluation both the
        weighted mean and the median site must meet it (`fedml.validation.site_medians`):
        a few sites' lies cannot stop a run."""
        meets = _COMPARISONS[self.op]
        value = Monitor(self.metric).value(row)
        if value is None or not meets(value, self.value):
            return False
        source, _, name = self.metric.partition(".")
        median = (row.get("evaluate_median") or {}).get(name) if source == "evaluate" else None
        return median is None or meets(median, self.value)


def _to_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
