"""Real numbers summed exactly under secure aggregation: fixed point in the ring of
integers mod 2^64 that the masks live in.

A site writes each value v as the integer round(v / unit) (two's complement in uint64),
so the masked sum of every site's integers, unmasked, is the sum of their values to
within half a unit per site. `limit` bounds each site's integers so that the sum of all
of them cannot wrap around: the server sets it to 2^62 / sites, and a value beyond it is
refused at the site (the reply fails) rather than silently wrapped.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

TOTAL_BOUND = 2**62  # every site's integers together stay below this in size


def binding(units: list[float], limit: int, *more: list[float]) -> bytes:
    """What a fixed-point input depends on, as bytes that every pairwise mask includes
    (`SiteSecAgg.masked`'s `context`): sites told different units or limits mask with
    masks that do not cancel, so a server cannot single one site out by scaling the
    others' inputs to nothing."""
    text = json.dumps([[float(u) for u in units], int(limit), *more], separators=(",", ":"))
    return hashlib.sha256(text.encode()).digest()


def check_plan(units: np.ndarray, limit: int, counts: int) -> None:
    """Refuse units and a limit an honest server does not send: the first `counts`
    entries (counts) in units of exactly 1, every unit finite and positive, and a
    limit in 1 .. TOTAL_BOUND (beyond it the sum could wrap around)."""
    if (
        units.ndim != 1
        or len(units) < counts
        or not (np.isfinite(units) & (units > 0)).all()
        or (units[:counts] != 1).any()
        or not 1 <= limit <= TOTAL_BOUND
    ):
        raise ValueError("the server's fixed-point units or limit are not ones fedml sends")


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
