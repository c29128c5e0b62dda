"""Aggregation: Flower-equal on floats, dtype-true on integer buffers."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from strategies.aggregate import WeightedMean, weighted_mean

finite = st.floats(-1e3, 1e3, width=32)
unit = st.floats(-1, 1, width=32)  # the scale of real model weights
shapes = st.sampled_from([(), (3,), (2, 4), (5, 1, 2)])


@st.composite
def client_replies(draw, dtype=np.float32, elements=finite):
    n = draw(st.integers(1, 6))
    shape_a, shape_b = draw(shapes), draw(shapes)
    replies = []
    for _ in range(n):
        record = ArrayRecord(
            {
                "a": Array(draw(arrays(dtype, shape_a, elements=elements))),
                "b": Array(draw(arrays(dtype, shape_b, elements=elements))),
            }
        )
        replies.append((record, draw(st.integers(1, 10_000))))
    return replies


def _flowers(replies):
    contents = [
        RecordDict({"arrays": r, "metrics": MetricRecord({"num-examples": w})}) for r, w in replies
    ]
    return aggregate_arrayrecords(contents, "num-examples")


@given(client_replies(np.float32, unit))
def test_matches_flowers_fedavg_aggregate_float32(replies):
    ours = weighted_mean([(r, float(w)) for r, w in replies])
    flowers = _flowers(replies)
    for key in ("a", "b"):
        assert ours[key].numpy().dtype == np.float32
        # Flower sums in float32, we in float64: they agree to 1e-6 at weight scale.
        np.testing.assert_allclose(ours[key].numpy(), flowers[key].numpy(), rtol=0, atol=1e-6)


@given(client_replies(np.float64, st.floats(-1e6, 1e6)))
def test_matches_flowers_fedavg_aggregate_float64(replies):
    ours = weighted_mean([(r, float(w)) for r, w in replies])
    flowers = _flowers(replies)
    for key in ("a", "b"):
        assert ours[key].numpy().dtype == np.float64
        np.testing.assert_allclose(ours[key].numpy(), flowers[key].numpy(), rtol=1e-9, atol=1e-6)


@given(client_replies(), st.randoms())
def test_order_of_replies_does_not_matter(replies, rnd):
    shuffled = replies[:]
    rnd.shuffle(shuffled)
    a = weighted_mean([(r, float(w)) for r, w in replies])
    b = weighted_mean([(r, float(w)) for r, w in shuffled])
    for key in ("a", "b"):
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=1e-6, atol=1e-6)


@given(
    arrays(np.float32, (4, 3), elements=finite),
    st.lists(st.integers(1, 100), min_size=1, max_size=5),
)
def test_mean_of_identical_updates_is_that_update(values, weights):
    records = [(ArrayRecord({"w": Array(values.copy())}), float(w)) for w in weights]
    np.testing.assert_allclose(weighted_mean(records)["w"].numpy(), values, rtol=1e-6, atol=1e-6)


def test_integer_buffers_stay_integers_and_are_rounded():
    records = [
        (ArrayRecord({"num_batches_tracked": Array(np.array(10, dtype=np.int64))}), 1.0),
        (ArrayRecord({"num_batches_tracked": Array(np.array(13, dtype=np.int64))}), 2.0),
    ]
    result = weighted_mean(records)["num_batches_tracked"].numpy()
    assert result.dtype == np.int64 and result.shape == ()
    assert result == 12  # (10 + 26) / 3
    # Flower's helper turns the same buffer into float64: the behaviour we avoid.
    contents = [RecordDict({"arrays": r, "metrics": MetricRecord({"n": w})}) for r, w in records]
    assert aggregate_arrayrecords(contents, "n")["num_batches_tracked"].numpy().dtype == np.float64


def test_mismatched_replies_are_refused():
    mean = WeightedMean()
    mean.add(ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))}), 1.0)
    with pytest.raises(ValueError, match="shape"):
        mean.add(ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))}), 1.0)
    with pytest.raises(ValueError, match="keys differ"):
        mean.add(ArrayRecord({"v": Array(np.zeros(3, dtype=np.float32))}), 1.0)
    with pytest.raises(ValueError, match="positive"):
        mean.add(ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))}), 0.0)
