"""Component state and Flower records survive the trip through files, without pickle."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import (
    array_shapes,
    arrays,
    boolean_dtypes,
    floating_dtypes,
    integer_dtypes,
    unsigned_integer_dtypes,
)
from safetensors.numpy import load, save

from fedml.arrays import from_numpy, to_numpy
from fedml.statefile import (
    decode_state,
    encode_state,
    recorddict_from_bytes,
    recorddict_to_bytes,
    rng_state,
    set_rng_state,
)

stored_dtypes = (
    boolean_dtypes()
    | integer_dtypes(endianness="=")
    | unsigned_integer_dtypes(endianness="=")
    | floating_dtypes(endianness="=", sizes=(16, 32, 64))
)
state_arrays = arrays(stored_dtypes, array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
)
state_values = st.recursive(
    json_scalars | state_arrays,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _through_files(state):
    """Encode, write as the run store does (JSON text + safetensors bytes), read back."""
    document, tensors = encode_state(state)
    text = json.dumps(document, sort_keys=True)
    return decode_state(json.loads(text), load(save(tensors)))


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.tobytes() == b.tobytes()
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


@given(state_values)
def test_state_round_trips_exactly(state):
    assert _same(state, _through_files(state))


def test_non_finite_floats_and_array_records_round_trip():
    record = ArrayRecord({"w": from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))})
    record["b"] = from_numpy(np.array([7], dtype=np.int64))
    back = _through_files({"m": record, "x": [math.inf, -math.inf], "n": math.nan})
    assert list(back["m"].keys()) == ["w", "b"]
    assert to_numpy(back["m"]["w"]).tobytes() == to_numpy(record["w"]).tobytes()
    assert to_numpy(back["m"]["b"]).dtype == np.int64
    assert back["x"] == [math.inf, -math.inf] and math.isnan(back["n"])


@pytest.mark.parametrize(
    ("state", "fragment"),
    [
        ({1: "x"}, "dict keys must be str"),
        ({"f": {1, 2}}, "cannot store set"),
        ({"c": np.zeros(2, dtype=complex)}, "dtype complex128 cannot be stored"),
    ],
)
def test_unstorable_state_is_refused_naming_where(state, fragment):
    with pytest.raises(TypeError, match=fragment):
        encode_state(state)


def test_random_state_round_trips_through_json():
    rng = random.Random(7)
    rng.random()
    saved = json.loads(json.dumps(rng_state(rng)))
    expected = [rng.random() for _ in range(5)]
    restored = random.Random(0)
    set_rng_state(restored, saved)
    assert [restored.random() for _ in range(5)] == expected


def test_recorddict_round_trips_with_flowers_encoding():
    records = RecordDict(
        {
            "ledger": MetricRecord({"epsilon": 1.25, "steps": 40}),
            "notes": ConfigRecord({"site": "hospital-a", "flags": [True, False]}),
            "buffers": ArrayRecord({"m": from_numpy(np.ones((2, 2), dtype=np.float32))}),
        }
    )
    back = recorddict_from_bytes(recorddict_to_bytes(records))
    assert dict(back["ledger"]) == {"epsilon": 1.25, "steps": 40}
    assert dict(back["notes"]) == {"site": "hospital-a", "flags": [True, False]}
    assert to_numpy(back["buffers"]["m"]).tolist() == [[1.0, 1.0], [1.0, 1.0]]
