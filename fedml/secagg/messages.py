"""How secure aggregation's four exchanges travel in Flower messages.

Message types (a ClientApp routes them by action): "train.secagg_keys" (advertise),
"train.secagg_share" (share), the ordinary "train" message with the `ROUND` record
(masked input) and "train.secagg_unmask" (unmask). Node IDs in these records are the
server's (the in-process engine's 1..N, the Ray engine's partition-id + 1, a real
SuperNode's ID): the server tells each site which one it is. The site keeps its side of
the round in `Context.state` under `STATE` between the messages.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedml.arrays import to_numpy
from fedml.secagg.protocol import PublicKeys, RoundPlan

KEYS_ACTION = "secagg_keys"
SHARE_ACTION = "secagg_share"
UNMASK_ACTION = "secagg_unmask"
ROUND = "fedml.secagg"  # ConfigRecord: node, round (+ plan, survivors, dropped)
KEYS = "fedml.secagg-keys"  # str(node) -> c || s public keys (64 bytes)
SEALED = "fedml.secagg-sealed"  # str(holder) -> sealed shares
DIGESTS = "fedml.secagg-digests"  # str(holder) -> SHA-256 of both shares
COMMITMENT = "fedml.secagg-commitment"  # "seed": SHA-256 of the site's self-mask seed
INBOX = "fedml.secagg-inbox"  # str(sender) -> sealed shares for this site
SHARES = "fedml.secagg-shares"  # str(site) -> the share the server asked for
MASKED = "masked"  # the ArrayRecord key of a masked input (uint64)
STATE = "fedml.secagg"  # Context.state record of a site's round in progress


def by_node(values: dict[int, bytes]) -> ConfigRecord:
    return ConfigRecord({str(node): value for node, value in values.items()})


def from_node_record(record: ConfigRecord | None) -> dict[int, bytes]:
    """{node: bytes} from a record; a malformed entry is dropped (untrusted input)."""
    out = {}
    for key, value in (record or {}).items():
        # canonical decimal digits only: "²".isdigit() holds, and "03" would alias 3
        if key.isascii() and key.isdigit() and str(int(key)) == key and isinstance(value, bytes):
            out[int(key)] = value
    return out


def keys_record(keys: dict[int, PublicKeys]) -> ConfigRecord:
    return by_node({node: c + s for node, (c, s) in keys.items()})


def keys_from(record: ConfigRecord | None) -> dict[int, PublicKeys]:
    return {
        node: (value[:32], value[32:])
        for node, value in from_node_record(record).items()
        if len(value) == 64
    }


def plan_record(plan: RoundPlan, node: int) -> ConfigRecord:
    return ConfigRecord(
        {
            "node": node,
            "round": plan.server_round,
            "sampled": list(plan.sampled),
            "threshold": plan.threshold,
            "neighbours": plan.neighbours,
        }
    )


def plan_from(record: ConfigRecord) -> RoundPlan:
    return RoundPlan(
        int(record["round"]),  # type: ignore[arg-type]
        tuple(int(v) for v in record["sampled"]),  # type: ignore[union-attr]
        int(record["threshold"]),  # type: ignore[arg-type]
        int(record["neighbours"]),  # type: ignore[arg-type]
    )


def masked_record(masked: np.ndarray) -> ArrayRecord:
    return ArrayRecord({MASKED: Array(np.ascontiguousarray(masked, dtype=np.uint64))})


def masked_from(content: RecordDict, size: int) -> np.ndarray | None:
    """A reply's masked input: exactly `size` uint64 values, else None (the server
    treats such a reply as a dropout). Never raises: a reply is untrusted."""
    record = content.array_records.get("arrays")
    array = record.get(MASKED) if record is not None else None
    if array is None or array.dtype != "uint64" or tuple(array.shape) != (size,):
        return None  # judged by the metadata before any byte is decoded
    try:
        values = to_numpy(array)
    except Exception:  # whatever a damaged or hostile payload makes NumPy raise
        return None
    return values if values.dtype == np.uint64 and values.shape == (size,) else None
