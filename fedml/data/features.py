"""Federated feature statistics: standardisation and mean imputation without pooling rows.

Raw tables hold features in their own units (age ~50, cholesterol ~240, lactate ~2); a
model trained on them with one learning rate learns nothing (fedml measured a logistic
regression on FLamby's raw heart-disease tables at a coin flip). The fix every pipeline
applies is to standardise each feature, and to fill a missing value with the feature's
mean, using statistics of the *training* rows. In a federation those rows are spread
across sites, so the statistics are computed the federated way (as NVFlare's federated
statistics and Flower's federated-analytics examples do): each site sends, per feature,
how many values it observed, their sum and their sum of squares (`FeatureStats.of_rows`,
never a row); the server adds them up (`+`) and derives each feature's mean and standard
deviation (`Standardization.from_stats`). The sums are taken around a `shift` the server
sends (its own test set's means, else 0), so that a feature far from zero (a year, a
timestamp) keeps its spread's digits: E[(x-s)^2] - (E[x]-s)^2 cancels nothing when s is
near the mean. They are exact to float64 rounding otherwise, so the result equals the
statistics of the pooled training rows (tests compare with NumPy).

The `Standardization` travels in every train and evaluate message (`to_config`: two
lists of floats in the message config) and is applied by the model itself
(`fedml.models.with_standardization`), so the model always takes raw rows, at the sites
and on the server's test set alike.

Under secure aggregation a site sends `to_vector()` in fixed point (`secure_units`,
`fedml.secagg.fixed_point`) and masked; the server unmasks only the sum (`from_sum`).
Limits: the statistics are not covered by differential privacy, and a site's plausible
statistics are trusted (a hostile site can skew a feature's mean); README's security
model says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedml.errors import FedmlError

MEAN_KEY, SCALE_KEY = "preprocess-mean", "preprocess-scale"  # message config keys
STATS_ACTION = "feature_stats"  # the statistics query's action: "query.feature_stats"
# A feature whose spread is below this fraction of its mean's distance from the shift is
# constant (the sums' float64 rounding alone leaves ~1.5e-8 of it): centred, not scaled.
MIN_RELATIVE_SCALE = 1e-7
MAX_ROWS = 10**12  # a site claiming more rows than this sent a broken record
# Values a model's float32 input can hold with room to spare: a mean or spread beyond
# this (in a reply, or combined) is refused, never turned into inf inside the model.
MAX_MAGNITUDE = 1e30
MIN_SCALE = 1 / MAX_MAGNITUDE  # a smaller spread is constant: float32 would make it 0
# The stats reply's metric keys, and the query's config key for the shift.
ROWS, OBSERVED, SUMS, SQUARES = "rows", "observed", "sums", "squares"
SHIFT_KEY = "shift"
# Under secure aggregation the query's config also carries the fixed-point units of the
# vector a site masks (`FeatureStats.to_vector`) and the largest integer it may send.
SECURE_UNITS_KEY, SECURE_LIMIT_KEY = "secure-units", "secure-limit"
FRACTION_BITS = 16  # a sum's unit is 2^-16 of the feature's spread on the server's test set


def secure_units(spread: np.ndarray) -> np.ndarray:
    """The fixed-point units of `to_vector`'s entries: 1 for the counts, 2^-16 of each
    feature's `spread` (its standard deviation on the server's test set; 1 where that is
    0 or unknown) for its sums, and 2^-16 of its square for its sums of squares."""
    spread = np.asarray(spread, dtype=np.float64)
    spread = np.where(np.isfinite(spread) & (spread > 0), spread, 1.0)
    fraction = 2.0**-FRACTION_BITS
    counts = np.ones(1 + len(spread))
    return np.concatenate([counts, spread * fraction, np.square(spread) * fraction])


@dataclass(frozen=True)
class FeatureStats:
    """Per-feature sufficient statistics of some rows: `rows`, and for each feature the
    number of values `observed` (not NaN), their `sums` and their sums of `squares`."""

    rows: int
    observed: np.ndarray  # float64 counts, one per feature (a capped site's are scaled)
    sums: np.ndarray  # float64, of (x - shift)
    squares: np.ndarray  # float64, of (x - shift)^2

    @classmethod
    def of_rows(cls, x: np.ndarray, shift: np.ndarray | None = None) -> FeatureStats:
        """The statistics of `x` (one row per example; NaN is a missing value) around
        `shift` (one value per feature; None: 0)."""
        values = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        if shift is not None:
            values = values - np.asarray(shift, dtype=np.float64)
        present = ~np.isnan(values)
        filled = np.where(present, values, 0.0)
        return cls(
            rows=len(values),
            observed=present.sum(axis=0).astype(np.float64),
            sums=filled.sum(axis=0),
            squares=np.square(filled).sum(axis=0),
        )

    def scaled(self, factor: float) -> FeatureStats:
        """The same statistics weighing `factor` times as much (a capped claim)."""
        rows = max(1, round(self.rows * factor))
        return FeatureStats(rows, self.observed * factor, self.sums * factor, self.squares * factor)

    def __add__(self, other: FeatureStats) -> FeatureStats:
        return FeatureStats(
            self.rows + other.rows,
            self.observed + other.observed,
            self.sums + other.sums,
            self.squares + other.squares,
        )

    @property
    def num_features(self) -> int:
        return len(self.sums)

    def to_metrics(self) -> dict[str, Any]:
        """As a Flower MetricRecord's values (ints and lists of floats)."""
        return {
            ROWS: self.rows,
            OBSERVED: [int(v) for v in self.observed],
            SUMS: [float(v) for v in self.sums],
            SQUARES: [float(v) for v in self.squares],
        }

    def to_vector(self) -> np.ndarray:
        """[rows, observed..., sums..., squares...] (float64): what a site masks."""
        return np.concatenate([[float(self.rows)], self.observed, self.sums, self.squares])

    @classmethod
    def from_sum(cls, vector: np.ndarray, num_features: int) -> FeatureStats:
        """The federation's statistics from the unmasked sum of the sites' vectors
        (`to_vector`, in fixed point: sums and squares carry rounding of half a unit
        per site, counts none); `ValueError` when it cannot be statistics of
        `num_features` features."""
        values = np.asarray(vector, dtype=np.float64)
        if values.shape != (1 + 3 * num_features,) or not np.isfinite(values).all():
            raise ValueError("the summed statistics have the wrong size or are not finite")
        rows = values[0]
        observed = values[1 : 1 + num_features]
        sums, squares = (
            values[1 + num_features : 1 + 2 * num_features],
            values[1 + 2 * num_features :],
        )
        if rows != round(rows) or not 1 <= rows <= MAX_ROWS:
            raise ValueError(f"the summed row count {rows:g} is not a count of rows")
        if (
            (observed != np.round(observed)).any()
            or (observed < 0).any()
            or (observed > rows).any()
        ):
            raise ValueError(f"the summed '{OBSERVED}' are not whole numbers 0 .. {rows:g}")
        seen = np.maximum(observed, 1)
        if (np.abs(sums) / seen > MAX_MAGNITUDE).any() or (squares / seen > MAX_MAGNITUDE**2).any():
            raise ValueError(f"the values' magnitude exceeds {MAX_MAGNITUDE:g}")
        return cls(int(rows), observed, sums, np.maximum(squares, 0.0))  # rounding: >= 0

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any], num_features: int) -> FeatureStats:
        """A site's statistics from its reply; `ValueError` naming what is wrong when they
        cannot be statistics of `num_features` features (a broken or lying reply)."""
        missing = {ROWS, OBSERVED, SUMS, SQUARES} - set(metrics)
        if missing:
            raise ValueError(f"the statistics lack {sorted(missing)}")
        rows = metrics[ROWS]
        if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= MAX_ROWS:
            raise ValueError(f"'{ROWS}' must be a row count 1 .. {MAX_ROWS:,}, got {rows!r}")
        arrays = []
        for key in (OBSERVED, SUMS, SQUARES):
            value = metrics[key]
            if not isinstance(value, list) or len(value) != num_features:
                raise ValueError(f"'{key}' must be a list of {num_features} numbers")
            array = np.asarray(value, dtype=np.float64)
            if not np.isfinite(array).all():
                raise ValueError(f"'{key}' holds a NaN or infinite value")
            arrays.append(array)
        observed, sums, squares = arrays
        if (
            (observed != np.round(observed)).any()
            or (observed < 0).any()
            or (observed > rows).any()
        ):
            raise ValueError(f"'{OBSERVED}' must be whole numbers 0 .. {ROWS} ({rows})")
        if ((observed == 0) & ((sums != 0) | (squares != 0))).any():
            raise ValueError("a feature with no observed value has sums")
        with np.errstate(over="ignore", invalid="ignore"):  # a hostile size is refused, not warned
            seen = np.maximum(observed, 1)
            if (np.abs(sums) / seen > MAX_MAGNITUDE).any() or (
                np.sqrt(squares / seen) > MAX_MAGNITUDE
            ).any():
                raise ValueError(f"the values' magnitude exceeds {MAX_MAGNITUDE:g}")
            # Cauchy-Schwarz: sum(x)^2 <= n * sum(x^2) for any n real values
            if (squares < 0).any() or (
                np.square(sums) > observed * squares * (1 + 1e-9) + 1e-9
            ).any():
                raise ValueError("the sums and sums of squares cannot come from real values")
        return cls(rows, observed, sums, squares)


@dataclass(frozen=True)
class Standardization:
    """Each feature's `mean` (what a missing value becomes) and `scale` (its standard
    deviation over the training rows, population form as scikit-learn's StandardScaler;
    1 for a constant feature): a raw value v becomes (v - mean) / scale."""

    mean: np.ndarray  # float64
    scale: np.ndarray  # float64

    @classmethod
    def from_stats(cls, stats: FeatureStats, shift: np.ndarray | None = None) -> Standardization:
        """From the federation's combined statistics, taken around `shift` (None: 0). A
        feature no site observed is left as it is (mean 0, scale 1; `check_observed`
        refuses it first). A `FedmlError` when the result is not finite or too large for
        the model's float32 inputs."""
        seen = np.maximum(stats.observed, 1)
        offset = np.zeros(len(stats.sums)) if shift is None else np.asarray(shift, np.float64)
        centred = np.where(stats.observed > 0, stats.sums / seen, 0.0)  # mean - shift
        variance = np.maximum(stats.squares / seen - np.square(centred), 0.0)
        scale = np.sqrt(variance)
        constant = (scale < MIN_SCALE) | (scale <= MIN_RELATIVE_SCALE * np.abs(centred))
        mean = np.where(stats.observed > 0, centred + offset, 0.0)
        result = cls(mean, np.where(constant, 1.0, scale))
        if not result.usable():
            raise FedmlError(
                "The sites' combined feature statistics are not finite numbers a model can "
                "use (a site sent values of absurd size); check the sites' data."
            )
        return result

    def usable(self) -> bool:
        """Finite, positive scales, and small enough for a model's float32 inputs."""
        return bool(
            np.isfinite(self.mean).all()
            and np.isfinite(self.scale).all()
            and (self.scale >= MIN_SCALE).all()
            and (np.abs(self.mean) <= MAX_MAGNITUDE).all()
            and (self.scale <= MAX_MAGNITUDE).all()
        )

    def to_config(self) -> dict[str, list[float]]:
        """The message config entries that carry it."""
        return {MEAN_KEY: [float(v) for v in self.mean], SCALE_KEY: [float(v) for v in self.scale]}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Standardization | None:
        """What a message's config carries (None: the run does not standardise); a
        `FedmlError` when the entries are broken."""
        if MEAN_KEY not in config and SCALE_KEY not in config:
            return None
        mean = np.asarray(config.get(MEAN_KEY, []), dtype=np.float64)
        scale = np.asarray(config.get(SCALE_KEY, []), dtype=np.float64)
        if mean.ndim != 1 or mean.shape != scale.shape or not len(mean):
            raise FedmlError(
                f"The message's '{MEAN_KEY}' and '{SCALE_KEY}' must be lists of one number "
                "per feature, of equal length."
            )
        result = cls(mean, scale)
        if not result.usable():
            raise FedmlError(
                f"The message's '{SCALE_KEY}' must be positive and both lists finite numbers "
                f"of size at most {MAX_MAGNITUDE:g}."
            )
        return result

    @property
    def num_features(self) -> int:
        return len(self.mean)


def check_observed(stats: FeatureStats, names: list[str] | None = None) -> None:
    """Refuse statistics with a feature that no site observed (all its values missing):
    there is nothing to impute it with."""
    never = np.flatnonzero(stats.observed == 0)
    if len(never):
        which = ", ".join(names[i] if names else f"#{i}" for i in never[:5])
        raise FedmlError(
            f"Feature(s) {which} have no value at any site (every row is missing them); "
            "drop those columns from every site's data."
        )


def unscaled_features(x: np.ndarray, limit: float = 10.0) -> list[tuple[int, float, float]]:
    """Features of `x` (rows) whose mean or spread is far from a standardised feature's
    (|mean| or standard deviation above `limit`): (index, mean, std) of each."""
    values = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    with np.errstate(all="ignore"):
        mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
    return [
        (i, float(mean[i]), float(std[i]))
        for i in range(values.shape[1])
        if math.isfinite(mean[i]) and (abs(mean[i]) > limit or std[i] > limit)
    ]
