"""Example-weighted averaging of ArrayRecords that keeps every array's dtype.

Flower's `aggregate_arrayrecords` multiplies arrays by float weights, so an int64 buffer
(BatchNorm's `num_batches_tracked`) comes back float64. Here sums run in float64 and each
result is cast back to its input dtype; integer arrays are rounded to the nearest integer.
Replies are folded in one at a time, so memory is O(model size), not O(clients x model).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord

from fedml.arrays import from_numpy, record_of, to_numpy


class WeightedMean:
    """Running example-weighted mean over ArrayRecords with identical keys and shapes."""

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, arrays: ArrayRecord, weight: float) -> None:
        """Fold one client's arrays, weighted by its example count, into the sum."""
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if self.count and set(arrays) != set(self._sums):
            raise ValueError("array keys differ from the first reply's keys")
        for key, array in arrays.items():
            values = to_numpy(array)
            if key not in self._sums:
                self._sums[key] = np.zeros(values.shape, dtype=np.float64)
                self._dtypes[key] = values.dtype
            elif values.shape != self._sums[key].shape:
                raise ValueError(
                    f"array '{key}' has shape {values.shape}, expected {self._sums[key].shape}"
                )
            self._sums[key] += values.astype(np.float64, copy=False) * weight
        self.total_weight += weight
        self.count += 1

    def result(self) -> ArrayRecord:
        """The weighted mean, each array in its original dtype (integers rounded)."""
        if not self.count:
            raise ValueError("no arrays were added")
        averaged: dict[str, Array] = {}
        for key, total in self._sums.items():
            mean = np.asarray(total / self.total_weight)  # 0-d stays an array
            averaged[key] = from_numpy(cast_like(mean, self._dtypes[key]))
        return record_of(averaged)


class MetricMean:
    """Running example-weighted mean of MetricRecords, key by key.

    Each metric is averaged over the replies that report it (a key missing from some
    replies is not dragged towards zero, as a mean over all weights would do). The
    weighting key itself is left out, as in Flower's `aggregate_metricrecords`.
    """

    def __init__(self, weight_key: str) -> None:
        self.weight_key = weight_key
        self._sums: dict[str, float | list[float]] = {}
        self._weights: dict[str, float] = {}

    def add(self, metrics: MetricRecord, weight: float) -> None:
        for key, value in metrics.items():
            if key == self.weight_key:
                continue
            if isinstance(value, list):
                current = self._sums.get(key, [0.0] * len(value))
                self._sums[key] = [c + v * weight for c, v in zip(current, value, strict=True)]
            else:
                self._sums[key] = self._sums.get(key, 0.0) + value * weight
            self._weights[key] = self._weights.get(key, 0.0) + weight

    def result(self) -> MetricRecord:
        averaged: dict[str, float | list[float]] = {}
        for key, total in self._sums.items():
            weight = self._weights[key]
            if isinstance(total, list):
                averaged[key] = [t / weight for t in total]
            else:
                averaged[key] = total / weight
        return MetricRecord(averaged)


def cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`values` as a C-contiguous array of `dtype`, rounded to the nearest integer first
    when `dtype` is not a floating type (so a mean of int64 buffers stays int64)."""
    if not np.issubdtype(dtype, np.floating) and not np.issubdtype(dtype, np.complexfloating):
        values = np.rint(values)
    return np.require(values.astype(dtype), requirements="C")


def weighted_mean(records: list[tuple[ArrayRecord, float]]) -> ArrayRecord:
    """Example-weighted mean of `(arrays, num_examples)` pairs."""
    acc = WeightedMean()
    for arrays, weight in records:
        acc.add(arrays, weight)
    return acc.result()
