"""Checks every client reply before it can reach aggregation.

One broken or hostile site must not end or poison a run. A training reply is rejected
(counted, never aggregated) when:

- "malformed": it has no single ArrayRecord, or no single MetricRecord, or an array
  that declares or decodes as no plain NumPy array (an object dtype, another serialisation
  type, a damaged header, a shape or dtype its bytes do not hold). Shape and dtype are
  compared with the global model's from the array's metadata before any byte is
  decoded, so an absurd shape is never allocated;
- "num-examples": its "num-examples" is missing, not a whole number, or not in
  [1, 2**53] (every weight is exact in float64, and any sum of them stays finite);
- "metrics": a metric is not a finite number (or a list of them), or one whose range is
  known is outside it: "accuracy" in [0, 1], "loss" >= 0; or the reply carries more
  than MAX_METRICS metrics, a name longer than MAX_METRIC_NAME characters or a list
  longer than MAX_METRIC_LIST (every history row would carry them);
- "keys": its arrays are not exactly the global model's keys;
- "shape": an array's shape or dtype differs from the global model's;
- "non-finite": an array holds NaN or inf;
- "norm": its update norm ||w - w_global|| exceeds `norm_factor` times the median norm
  of the round's other valid updates that arrived before it. The first five wait and
  are judged against each other and against the median accepted norm of the previous
  accepted round (`ScreeningMemory`, committed with each round), a vote the round's first
  repliers do not control: three colluders among the first five are outvoted (four are
  not: they are the majority of those five votes). In a run's first round there is no
  such vote, and two colluders among the first five are outvoted (three are not). A
  round that ends with fewer is judged among those; with fewer than three valid
  updates and no earlier round there is no norm check, as a median of fewer means
  little. Later updates meet the median of all before them: colluders who reply late
  are outvoted by the honest majority.

With `clip_norm > 0` each accepted update is then scaled down to that L2 norm
(w_global + (w - w_global) * min(1, clip / ||w - w_global||)).

A reply's weight is its own claim ("num-examples"), which a hostile site could inflate
to take the average over. With `max_weight_factor > 0` an accepted reply's claim is
capped at that factor times the median claim of the previous accepted round's accepted
replies (`ScreeningMemory`: known before the round, so the cap does not depend on the
order replies arrive in; a site's data rarely changes between rounds). A capped reply is
aggregated with the capped weight and counted in `Tally.capped`. With the default factor
10 an honest FedAvg run is almost never touched; lower it (3, 2) where hostile sites are
expected. A run's first round has no earlier claims: there the first replies (those
that wait for the norm check) judge each other's claims, and later ones meet their
median (`ClaimReference`).

Screening streams: replies go through one at a time and at most five wait for the norm
check, so the server holds O(model size) of client arrays, not O(clients x model size).
Evaluation replies (metrics only) get the malformed / num-examples / metrics checks,
and their weights are capped against the median of all of the round's other
evaluation claims (evaluation replies are collected anyway, so order does not matter).
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.common.constant import SType

from fedml.arrays import from_numpy, record_of, to_numpy
from fedml.failures import DECLINED_CODE, MAX_REASONS, OTHER_REASON, failure_reason
from fedml.metrics import AUROC, COUNTS, RATES

NORM_SAMPLE = 3  # valid updates a norm check needs when no earlier round votes
FIRST_SAMPLE = 5  # the first valid updates of a round wait and judge each other
MAX_EXAMPLES = 2**53  # the largest weight a reply may claim (exact in float64)
UNIT_METRICS = ("accuracy", *RATES, AUROC)  # metrics that must lie in [0, 1]
NON_NEGATIVE_METRICS = ("loss", *COUNTS)  # metrics that must be >= 0
MAX_METRICS = 64  # metrics one reply may carry (fedml's client sends a handful)
MAX_METRIC_NAME = 64  # characters in a metric's name
MAX_METRIC_LIST = 1024  # values in a list-valued metric


@dataclass
class Tally:
    """What happened to one round's replies: counted as they stream past."""

    replied: int = 0
    failed: int = 0
    accepted: int = 0
    capped: int = 0  # accepted replies whose weight claim was cut down
    rejected: Counter[str] = field(default_factory=Counter)
    failed_reasons: Counter[str] = field(default_factory=Counter)  # privacy declines aside

    def answered(self, reply: Message) -> bool:
        """Count `reply`: whether it carries content (else it failed, and why is noted:
        at most MAX_REASONS distinct reasons a round, the rest as OTHER_REASON)."""
        if not reply.has_error():
            self.replied += 1
            return True
        self.failed += 1
        if reply.error.code != DECLINED_CODE:
            reason = failure_reason(reply.error)
            known = reason in self.failed_reasons or len(self.failed_reasons) < MAX_REASONS
            self.failed_reasons[reason if known else OTHER_REASON] += 1
        return False


@dataclass
class ScreeningMemory:
    """What the latest accepted round's accepted replies looked like: their median update
    norm (the next round's first updates are judged against it too) and their median
    weight claim (every claim of the next round is capped against it). Both are fixed
    before a round starts, so the verdicts do not depend on the order replies arrive in
    (the Ray engine and the in-process engine agree). It is run state (a component with
    `state_dict()`), so a resumed run judges exactly as an uninterrupted one; a round
    that is retried or skipped leaves it as it was."""

    norm_median: float | None = None
    claim_median: float | None = None
    _norms: list[float] = field(default_factory=list)  # this attempt's accepted replies
    _claims: list[float] = field(default_factory=list)

    def observe(self, norm: float, claim: float) -> None:
        self._norms.append(norm)
        self._claims.append(claim)

    def end_attempt(self, accepted: bool) -> None:
        """The attempt was accepted (its replies become the memory) or discarded."""
        if accepted and self._norms:
            self.norm_median = float(np.median(self._norms))
            self.claim_median = float(np.median(self._claims))
        self._norms, self._claims = [], []

    def state_dict(self) -> dict[str, float | None]:
        return {"norm_median": self.norm_median, "claim_median": self.claim_median}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.norm_median = state.get("norm_median")
        self.claim_median = state.get("claim_median")
        self._norms, self._claims = [], []


@dataclass(frozen=True)
class UpdateValidator:
    """Screens one round's replies against the global arrays that were sent out."""

    norm_factor: float = 10.0
    clip_norm: float = 0.0
    max_weight_factor: float = 10.0
    weight_key: str = "num-examples"

    # -- training replies ------------------------------------------------------------------
    def screen(
        self,
        replies: Iterable[Message],
        global_arrays: ArrayRecord,
        tally: Tally,
        memory: ScreeningMemory | None = None,
    ) -> Iterator[Message]:
        """Yield the replies that may be aggregated (clipped if asked), counting every
        reply in `tally`; error replies count as failed. `memory` (the previous accepted
        round's medians) judges the first updates and caps the claims, and learns this
        round's."""
        memory = memory if memory is not None else ScreeningMemory()
        earlier = [memory.norm_median] if memory.norm_median is not None else []
        claims = ClaimReference(memory.claim_median)
        sample = FIRST_SAMPLE
        reference = {k: to_numpy(v) for k, v in global_arrays.items()}
        norms: list[float] = []  # norms of the valid updates so far, as they came
        ordered = SortedValues()  # the same, in order: the median of those before each one
        waiting: list[tuple[Message, dict[str, np.ndarray], float]] = []
        for reply in _answered(replies, tally):
            problem, arrays = self._check_train(reply.content, reference)
            if problem:
                tally.rejected[problem] += 1
                continue
            norm = update_norm(arrays, reference)
            norms.append(norm)
            if len(norms) <= sample:  # the first ones wait, then judge each other
                waiting.append((reply, arrays, norm))
                if len(norms) == sample:
                    yield from self._judge_first(
                        waiting, norms, earlier, reference, tally, memory, claims
                    )
                    waiting.clear()
            elif not self._outsized(norm, ordered.median(), tally):
                yield self._accept(reply, arrays, norm, reference, tally, memory, claims.median)
            ordered.add(norm)
        if waiting and (len(waiting) >= NORM_SAMPLE or earlier):  # ended before `sample`
            yield from self._judge_first(waiting, norms, earlier, reference, tally, memory, claims)
        else:  # too few for a norm check, and nothing earlier to judge by
            first = claims.judge_first([self._claim(r.content) for r, _, _ in waiting])
            for (early, early_arrays, early_norm), median in zip(waiting, first, strict=True):
                yield self._accept(
                    early, early_arrays, early_norm, reference, tally, memory, median
                )

    def _judge_first(
        self,
        waiting: list[tuple[Message, dict[str, np.ndarray], float]],
        norms: list[float],
        earlier: list[float],
        reference: dict[str, np.ndarray],
        tally: Tally,
        memory: ScreeningMemory,
        claims: ClaimReference,
    ) -> Iterator[Message]:
        """The first updates of a round (they lead `norms`), each judged against the
        round's other valid updates so far and the previous round's median; their weight
        claims as `claims` says (see `ClaimReference`)."""
        claim_medians = claims.judge_first([self._claim(r.content) for r, _, _ in waiting])
        for index, (early, early_arrays, early_norm) in enumerate(waiting):
            others = norms[:index] + norms[index + 1 :] + earlier  # a few: the first ones
            median = float(np.median(others)) if others else None
            if not self._outsized(early_norm, median, tally):
                yield self._accept(
                    early, early_arrays, early_norm, reference, tally, memory,
                    claim_medians[index],
                )  # fmt: skip

    def _outsized(self, norm: float, median: float | None, tally: Tally) -> bool:
        """Whether `norm` is over `norm_factor` times the `median` of the others' norms
        (None: there are none), counted as rejected when it is."""
        if self.norm_factor <= 0 or median is None:  # the check is off, or no reference
            return False
        if median > 0 and norm > self.norm_factor * median:
            tally.rejected["norm"] += 1
            return True
        return False

    def _check_train(
        self, content: RecordDict, reference: dict[str, np.ndarray]
    ) -> tuple[str | None, dict[str, np.ndarray]]:
        if len(content.array_records) != 1:
            return "malformed", {}
        problem = self._check_metrics(content)
        if problem:
            return problem, {}
        record = next(iter(content.array_records.values()))
        if set(record.keys()) != set(reference):
            return "keys", {}
        arrays = {}
        for key, expected in reference.items():
            array = record[key]
            if not _plain_dtype(array.dtype):
                return "malformed", {}
            if tuple(array.shape) != expected.shape or array.dtype != str(expected.dtype):
                return "shape", {}
            values = _decoded(array, expected)
            if values is None:
                return "malformed", {}
            if values.dtype.kind in "fc" and not np.isfinite(values).all():
                return "non-finite", {}
            arrays[key] = values
        return None, arrays

    def _check_metrics(self, content: RecordDict) -> str | None:
        """The checks every reply gets: one MetricRecord, a usable weight, finite
        metric values."""
        if len(content.metric_records) != 1:
            return "malformed"
        return metrics_problem(next(iter(content.metric_records.values())), self.weight_key)

    def _claim(self, content: RecordDict) -> float:
        return float(next(iter(content.metric_records.values()))[self.weight_key])

    def _cap_weight(self, content: RecordDict, median: float | None, tally: Tally) -> float:
        """Cut the reply's weight claim to `max_weight_factor` x `median` (a claim median
        known before the replies arrived); the weight it is aggregated with."""
        metrics = next(iter(content.metric_records.values()))
        claim = float(metrics[self.weight_key])
        if self.max_weight_factor <= 0 or median is None:
            return claim
        cap = max(1, math.floor(self.max_weight_factor * median))
        if claim > cap:
            metrics[self.weight_key] = cap
            tally.capped += 1
            return float(cap)
        return claim

    def _accept(
        self,
        reply: Message,
        arrays: dict[str, np.ndarray],
        norm: float,
        reference: dict[str, np.ndarray],
        tally: Tally,
        memory: ScreeningMemory,
        claim_median: float | None,
    ) -> Message:
        tally.accepted += 1
        memory.observe(norm, self._cap_weight(reply.content, claim_median, tally))
        clipped = clip_to_norm(arrays, reference, self.clip_norm, norm)
        if clipped is arrays:
            return reply
        key = next(iter(reply.content.array_records))
        reply.content[key] = record_of({k: from_numpy(v) for k, v in clipped.items()})
        return reply

    # -- evaluation replies ----------------------------------------------------------------
    def screen_evaluation(self, replies: Iterable[Message], tally: Tally) -> list[Message]:
        """The evaluation replies that may be aggregated; the rest counted in `tally`."""
        valid: list[Message] = []
        for reply in _answered(replies, tally):
            problem = self._check_metrics(reply.content)
            if problem:
                tally.rejected[problem] += 1
                continue
            tally.accepted += 1
            valid.append(reply)
        claims = [self._claim(reply.content) for reply in valid]
        # each claim against the median of all the others: order does not matter
        for reply, median in zip(valid, medians_of_the_others(claims), strict=True):
            self._cap_weight(reply.content, median, tally)
        return valid


class ClaimReference:
    """The median weight claim each accepted training reply is capped against.

    From a run's second round on it is the previous accepted round's median claim
    (`ScreeningMemory`), the same for every reply. In the first round there is none, so
    the first replies (those waiting for the norm check) judge each other: each claim
    against the median of the other waiting claims, as their norms are judged; every
    later reply of the round against the median of those first claims. A liar among the
    first is outvoted by the honest rest; one after them meets their median. Either
    way no claim outweighs `max_weight_factor` times an honest median from round 1 on."""

    def __init__(self, earlier: float | None) -> None:
        self.median = earlier

    def judge_first(self, claims: list[float]) -> list[float | None]:
        """The medians the first replies' `claims` are capped against."""
        if self.median is not None:
            return [self.median] * len(claims)
        self.median = float(np.median(claims)) if claims else None
        return medians_of_the_others(claims)


def metrics_problem(metrics: Mapping[str, Any], weight_key: str = "num-examples") -> str | None:
    """What is wrong with a reply's metrics ("num-examples" or "metrics"), None when
    nothing: a usable weight, at most MAX_METRICS bounded names and lists, finite values,
    rates and AUROC in [0, 1], non-negative losses and counts, confusion counts adding up
    to the weight. A site's test metrics (`fedml.server.site_results`) get the same."""
    if not _example_count(metrics.get(weight_key)):
        return "num-examples"
    if len(metrics) > MAX_METRICS or any(
        len(name) > MAX_METRIC_NAME or (isinstance(value, list) and len(value) > MAX_METRIC_LIST)
        for name, value in metrics.items()
    ):
        return "metrics"
    if not all(_finite_metric(value) for value in metrics.values()):
        return "metrics"
    for name, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if name in UNIT_METRICS and not all(0.0 <= v <= 1.0 for v in values):
            return "metrics"
        if name in NON_NEGATIVE_METRICS and not all(v >= 0.0 for v in values):
            return "metrics"
    if any(key in metrics for key in COUNTS) and not _counts_add_up(metrics, weight_key):
        return "metrics"
    return None


def _counts_add_up(metrics: Mapping[str, Any], weight_key: str) -> bool:
    """Confusion counts are whole numbers, all four present, adding up to the reply's
    example count (so they cannot outweigh its capped claim)."""
    if not all(key in metrics for key in COUNTS):
        return False
    counts = [metrics[key] for key in COUNTS]
    if any(isinstance(c, list) or float(c) != int(c) for c in counts):
        return False
    return sum(int(c) for c in counts) == metrics[weight_key]


def site_medians(replies: list[Message], weight_key: str = "num-examples") -> dict[str, float]:
    """Each scalar metric's median over the (screened) replies that report it, the
    weight claim and confusion counts aside: one site, one vote. A target on federated
    evaluation must be met by this too, so a few sites claiming perfect scores over huge
    (capped) example counts cannot stop a run: the median moves only within the honest
    sites' spread."""
    values: dict[str, list[float]] = {}
    for reply in replies:
        for name, value in next(iter(reply.content.metric_records.values())).items():
            if name != weight_key and name not in COUNTS and not isinstance(value, list):
                values.setdefault(name, []).append(float(value))
    return {name: float(np.median(found)) for name, found in sorted(values.items())}


def _plain_dtype(name: object) -> bool:
    """Whether an array's declared dtype is a plain number type (not object, not text
    NumPy cannot parse): anything else is malformed, whatever the model's dtype."""
    try:
        dtype = np.dtype(name)  # type: ignore[call-overload]
    except Exception:  # a hostile dtype string
        return False
    return dtype.kind in "biufc" and not dtype.hasobject


def _decoded(array: Array, expected: np.ndarray) -> np.ndarray | None:
    """The array's values, when its bytes are a plain NumPy array of the expected shape
    and dtype; None for anything else (never an exception: a reply is untrusted)."""
    if array.stype != SType.NUMPY:
        return None
    try:
        values = to_numpy(array)
    except Exception:  # whatever a damaged or hostile payload makes NumPy raise
        return None
    if values.shape != expected.shape or values.dtype != expected.dtype:
        return None
    return values


class SortedValues:
    """Numbers kept sorted as they arrive, so that the median of those so far costs a
    lookup instead of a sort: a round of many thousand replies stays linear, not
    quadratic. The median is NumPy's: the middle value, or the mean of the two middle
    values for an even count."""

    def __init__(self) -> None:
        self._values: list[float] = []

    def add(self, value: float) -> None:
        bisect.insort(self._values, value)

    def median(self) -> float | None:
        """The median of the values so far (None before the first)."""
        return _sorted_median(self._values, len(self._values), skip=len(self._values))


def medians_of_the_others(values: list[float]) -> list[float | None]:
    """For each value, the median of all the other values (None when there are none),
    equal to `np.median` of the list without it; one sort instead of one per value."""
    ordered = sorted(values)
    return [
        _sorted_median(ordered, len(ordered) - 1, skip=bisect.bisect_left(ordered, value))
        for value in values
    ]


def _sorted_median(ordered: list[float], count: int, skip: int) -> float | None:
    """The median of the `count` values of sorted `ordered` left when the one at index
    `skip` is skipped (`skip` past the end: none is)."""
    if count == 0:
        return None

    def at(index: int) -> float:
        return ordered[index if index < skip else index + 1]

    middle = count // 2
    return float(at(middle)) if count % 2 else (at(middle - 1) + at(middle)) / 2


def _answered(replies: Iterable[Message], tally: Tally) -> Iterator[Message]:
    """The replies that carry content; error replies are counted as failed."""
    for reply in replies:
        if tally.answered(reply):
            yield reply


def finite_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _example_count(value: object) -> bool:
    """A whole number of examples in [1, MAX_EXAMPLES] (as an int or a float)."""
    return (
        finite_number(value)
        and float(value).is_integer()  # type: ignore[arg-type]
        and 1 <= value <= MAX_EXAMPLES  # type: ignore[operator]
    )


def _finite_metric(value: object) -> bool:
    return all(map(finite_number, value if isinstance(value, list) else [value]))


def update_norm(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """L2 norm of w - w_global over the floating-point arrays, in float64."""
    total = 0.0
    for key, values in arrays.items():
        if values.dtype.kind == "f":
            delta = values.astype(np.float64) - reference[key].astype(np.float64)
            total += float(np.dot(delta.ravel(), delta.ravel()))
    return math.sqrt(total)


def clip_to_norm(
    arrays: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    clip_norm: float,
    norm: float | None = None,
) -> dict[str, np.ndarray]:
    """`arrays` with the floating-point update w - w_global scaled down to L2 norm
    `clip_norm` (0: off), other arrays (counters) as they are; `arrays` itself when no
    scaling is needed. `norm`: the update's norm, when the caller has it already. Used
    by the server's screen and, under secure aggregation, by each site on its own update."""
    if clip_norm <= 0:
        return arrays
    norm = update_norm(arrays, reference) if norm is None else norm
    if norm <= clip_norm:
        return arrays
    scale = clip_norm / norm
    return {
        k: (reference[k] + (v - reference[k]) * scale).astype(v.dtype) if v.dtype.kind == "f" else v
        for k, v in arrays.items()
    }
