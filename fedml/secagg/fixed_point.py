"""Real numbers summed exactly under secure aggregation: fixed point in the ring of
integers mod 2^64 that the masks live in.

A site writes each value v as the integer round(v / unit) (two's complement in uint64),
so the masked sum of every site's integers, unmasked, is the sum of their values to
within half a unit per site. `limit` bounds each site's integers so that the sum of all
of them cannot wrap around: the server sets it to 2^62 / sites, and a value beyond it is
refused at the site (the reply fails) rather than silently wrapped.
"""

from __future__ import annotations

import numpy as np

TOTAL_BOUND = 2**62  # every site's integers together stay below this in size


def site_limit(sites: int) -> int:
    """The largest integer one of `sites` sites may send."""
    return TOTAL_BOUND // max(sites, 1)


def encode(values: np.ndarray, units: np.ndarray, limit: int) -> np.ndarray:
    """`values` in `units`, as uint64; `ValueError` when one is not finite or its
    integer exceeds `limit` in size."""
    values = np.asarray(values, dtype=np.float64)
    units = np.asarray(units, dtype=np.float64)
    if values.shape != units.shape or not (np.isfinite(units) & (units > 0)).all():
        raise ValueError("the fixed-point units do not fit the values")
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = np.rint(values / units)
    if not np.isfinite(scaled).all() or (np.abs(scaled) > limit).any():
        worst = int(np.nanargmax(np.where(np.isfinite(scaled), np.abs(scaled), np.inf)))
        raise ValueError(
            f"value #{worst} ({values[worst]:.6g}) is {abs(values[worst] / units[worst]):.3g} "
            f"units of {units[worst]:.3g}, beyond the {limit:.3g} a site may send"
        )
    return scaled.astype(np.int64).view(np.uint64)


def decode(total: np.ndarray, units: np.ndarray) -> np.ndarray:
    """The unmasked sum of the sites' integers, back in the values' units (float64)."""
    signed = np.asarray(total, dtype=np.uint64).view(np.int64)
    return signed.astype(np.float64) * np.asarray(units, dtype=np.float64)
