"""A site's update as one vector in the ring Z_(2^64), summable by the server.

Each site sends the vector x = [n * q(w - g) for every float array, n * v for every
integer array, n * m(metric) for every metric, e, n], where g is the global model it was
sent, e its example count, n its weight (e for FedAvg; 1 for client-level DP's equal
weights) and q the stochastic quantiser onto {0, ..., 2^bits - 1} over [-clip, clip]. The sum of the
vectors (uint64 arithmetic wraps, which is the ring's addition) is then
[sum n_i q_i, sum n_i v_i, sum n_i], and `decode` turns it into the example-weighted
mean of the updates: FedAvg's aggregate, exact up to one quantum 2 clip / (2^bits - 1)
per value (stochastic rounding is unbiased) for values inside [-clip, clip]. Metrics (the
training loss) are quantised the same way over [0, METRIC_MAX]. Integer
arrays (BatchNorm's counters) are summed exactly, and their mean is rounded to their
dtype as plain aggregation does (strategies/aggregate.py).

The sums stay below 2^64 while the total example count is below 2^(64 - bits): `decode`
refuses a total outside [1, 2^(64 - bits)) (a site that lies about its count).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedml.errors import FedmlError

MAX_BITS = 32
METRIC_MAX = 100.0  # metrics (a loss) are summed over [0, METRIC_MAX]


@dataclass(frozen=True)
class Layout:
    """Which arrays a vector holds, in order, with their shapes and dtypes."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    clip: float
    bits: int
    metrics: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        arrays: dict[str, np.ndarray],
        clip: float,
        bits: int,
        metrics: tuple[str, ...] = (),
    ) -> Layout:
        if not 1 <= bits <= MAX_BITS:
            raise FedmlError(f"secagg.bits must be in 1..{MAX_BITS}, got {bits}.")
        if not clip > 0:
            raise FedmlError(f"secagg.clip must be > 0, got {clip}.")
        return cls(
            tuple(arrays),
            tuple(a.shape for a in arrays.values()),
            tuple(a.dtype for a in arrays.values()),
            clip,
            bits,
            metrics,
        )

    @property
    def size(self) -> int:
        """Values in a vector: every array's, every metric, the examples and the weight."""
        return sum(int(np.prod(shape)) for shape in self.shapes) + len(self.metrics) + 2

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def max_total(self) -> int:
        """The largest total example count whose sums cannot wrap around."""
        return 2 ** (64 - self.bits) - 1


def encode(
    layout: Layout,
    trained: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    num_examples: int,
    rng: np.random.Generator,
    metrics: dict[str, float] | None = None,
    weight: int | None = None,
) -> np.ndarray:
    """The uint64 vector of a site that trained `reference` into `trained` on
    `num_examples` examples, with its `metrics`, weighted by `weight` (default: the
    examples; see the module docstring)."""
    weight = num_examples if weight is None else weight
    for name, value in (("num_examples", num_examples), ("weight", weight)):
        if not 1 <= value <= layout.max_total():
            raise ValueError(f"{name} must be in 1..{layout.max_total()}, got {value}")
    parts = []
    for name, dtype in zip(layout.names, layout.dtypes, strict=True):
        values = np.asarray(trained[name])
        if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            ints = values.astype(np.int64).ravel()
        else:
            update = values.astype(np.float64) - np.asarray(reference[name], dtype=np.float64)
            ints = _quantised(update, -layout.clip, layout.clip, layout.levels, rng).ravel()
        parts.append(ints.astype(np.uint64) * np.uint64(weight))  # wraps like the ring
    values = [float((metrics or {}).get(name, 0.0)) for name in layout.metrics]
    metric_ints = _quantised(np.array(values), 0.0, METRIC_MAX, layout.levels, rng)
    parts.append(metric_ints.astype(np.uint64) * np.uint64(weight))
    parts.append(np.array([num_examples, weight], dtype=np.uint64))
    return np.concatenate(parts)


@dataclass(frozen=True)
class Decoded:
    """What the sum of the sites' vectors says."""

    arrays: dict[str, np.ndarray]  # the weighted mean of the trained arrays
    examples: int  # the sites' examples, summed
    weight: int  # the sites' weights, summed (the number of sites under equal weights)
    metrics: dict[str, float]  # the weighted mean of each metric


def decode(layout: Layout, total: np.ndarray, reference: dict[str, np.ndarray]) -> Decoded:
    """The sum of the sites' vectors, read. A ValueError when it cannot be an honest
    sum: a count out of range, or a quantised value above what the summed weights allow
    (a site that claimed a weight it did not apply, or wrapped the ring)."""
    if total.shape != (layout.size,):
        raise ValueError(f"the sum has {total.size} values, the layout {layout.size}")
    examples, count = int(total[-2]), int(total[-1])  # count: the summed weights
    for name, value in (("example count", examples), ("weight", count)):
        if not 1 <= value <= layout.max_total():
            raise ValueError(f"the summed {name} {value} is out of range")
    scale = layout.levels / (2 * layout.clip)
    ceiling = np.uint64(count * layout.levels)  # < 2^64: count < 2^(64 - bits)
    arrays, start = {}, 0
    for name, shape, dtype in zip(layout.names, layout.shapes, layout.dtypes, strict=True):
        size = int(np.prod(shape))
        chunk = total[start : start + size]
        start += size
        if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            mean = chunk.view(np.int64) / count  # two's complement: negatives sum right
            arrays[name] = np.rint(mean).astype(dtype).reshape(shape)
        else:
            if np.any(chunk > ceiling):
                raise ValueError(f"array '{name}' sums beyond what the summed weights allow")
            update = chunk.astype(np.float64) / count / scale - layout.clip
            value = np.asarray(reference[name], dtype=np.float64).reshape(shape) + update.reshape(
                shape
            )
            arrays[name] = value.astype(dtype)
    sums = total[start : start + len(layout.metrics)]
    if np.any(sums > ceiling):
        raise ValueError("a metric sums beyond what the summed weights allow")
    means = sums.astype(np.float64) / count / layout.levels * METRIC_MAX
    metrics = dict(zip(layout.metrics, map(float, means), strict=True))
    return Decoded(arrays, examples, count, metrics)


def _quantised(
    values: np.ndarray, low: float, high: float, levels: int, rng: np.random.Generator
) -> np.ndarray:
    """Stochastic rounding of `values` (clipped to [low, high]) onto 0..levels."""
    scaled = (np.clip(values, low, high) - low) * (levels / (high - low))
    floor = np.floor(scaled)
    return (floor + (rng.random(scaled.shape) < scaled - floor)).astype(np.int64)
