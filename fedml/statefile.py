"""Component state and Flower records as files, without pickle.

A stateful component (a strategy, a scenario, a convergence control) offers
`state_dict() -> dict` and `load_state_dict(dict)`. The dict may hold JSON values
(str, int, float incl. NaN/inf, bool, None, lists, tuples, str-keyed dicts), numpy
arrays and Flower `ArrayRecord`s. `encode_state` splits it into a JSON document and a
flat `{name: ndarray}` map for safetensors; `decode_state` joins them again. Tuples come
back as lists (JSON has no tuple); a component's `load_state_dict` converts what it needs.

Per-node Flower state (`Context.state`, a `RecordDict`) is stored with Flower's own
protobuf serialisation.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedml.arrays import from_numpy, to_numpy

ARRAY = "$array"
ARRAY_RECORD = "$arrayrecord"
_JSON_SCALARS = frozenset({int, float, str, bool, type(None)})


def encode_state(state: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """Split `state` into a JSON-ready value and the arrays it references."""
    arrays: dict[str, np.ndarray] = {}

    def put(array: np.ndarray, where: str) -> str:
        if array.dtype.kind not in "biuf":
            raise TypeError(
                f"state at {where or 'top'}: arrays of dtype {array.dtype} cannot be stored "
                "(use bool, integer or float arrays)"
            )
        name = f"a{len(arrays)}"
        arrays[name] = np.require(array, requirements="C")  # keeps 0-d arrays 0-d
        return name

    def walk(value: Any, where: str) -> Any:
        if isinstance(value, np.ndarray):
            return {ARRAY: put(value, where)}
        if isinstance(value, ArrayRecord):
            return {ARRAY_RECORD: [[k, put(to_numpy(a), f"{where}.{k}")] for k, a in value.items()]}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise TypeError(f"state at {where or 'top'}: dict keys must be str")
            return {k: walk(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list | tuple):
            if all(type(v) in _JSON_SCALARS for v in value):  # fast path: RNG states
                return list(value)
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if value is None or isinstance(value, str | int | float | bool):
            return value
        raise TypeError(
            f"state at {where or 'top'}: cannot store {type(value).__name__} "
            "(use JSON values, numpy arrays or ArrayRecords)"
        )

    return walk(state, ""), arrays


def decode_state(document: Any, arrays: dict[str, np.ndarray]) -> Any:
    """Inverse of `encode_state`."""
    if isinstance(document, dict):
        if set(document) == {ARRAY}:
            return arrays[document[ARRAY]]
        if set(document) == {ARRAY_RECORD}:
            return ArrayRecord(
                {key: from_numpy(arrays[name]) for key, name in document[ARRAY_RECORD]}
            )
        return {k: decode_state(v, arrays) for k, v in document.items()}
    if isinstance(document, list):
        return [decode_state(v, arrays) for v in document]
    return document


def recorddict_to_bytes(records: RecordDict) -> bytes:
    """Flower's protobuf encoding of a RecordDict (what a SuperLink sends on the wire)."""
    return recorddict_to_proto(records).SerializeToString()


def recorddict_from_bytes(data: bytes) -> RecordDict:
    """Inverse of `recorddict_to_bytes`."""
    return recorddict_from_proto(ProtoRecordDict.FromString(data))


def rng_state(rng: random.Random) -> list[Any]:
    """A `random.Random`'s state as JSON values."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: list[Any]) -> None:
    """Inverse of `rng_state` (JSON turned the state's tuples into lists)."""
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))
