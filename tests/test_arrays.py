"""Fast Array codecs: the same bytes and values as Flower's own conversions."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays, scalar_dtypes

from fedml.arrays import from_numpy, from_state_dict, to_numpy, to_state_dict

any_array = arrays(
    dtype=scalar_dtypes(), shape=array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
)


@given(any_array)
def test_encode_gives_flowers_exact_bytes(values):
    ours, flowers = from_numpy(values), Array(values)
    assert (ours.dtype, ours.shape, ours.stype, ours.data) == (
        flowers.dtype,
        flowers.shape,
        flowers.stype,
        flowers.data,
    )


@given(any_array, st.booleans())
def test_decode_equals_flowers_decode(values, fortran):
    if fortran:
        values = np.asfortranarray(values)
    decoded = to_numpy(Array(values))
    expected = Array(values).numpy()
    assert decoded.dtype == expected.dtype and decoded.shape == expected.shape
    assert decoded.tobytes() == expected.tobytes()
    assert decoded.flags.writeable


def test_state_dict_round_trip_matches_flower():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    ours = from_state_dict(model.state_dict())
    flowers = ArrayRecord(model.state_dict())
    assert list(ours) == list(flowers)
    assert ours.object_id == flowers.object_id  # Flower's content hash: identical records
    back = to_state_dict(ours)
    for key, tensor in model.state_dict().items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor)
