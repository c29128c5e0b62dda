"""Federated feature statistics (fedml.data.features), the model that standardises raw
rows (fedml.models.with_standardization) and the run's standardisation part
(fedml.preprocessing): statistics against pooled NumPy, replies a hostile or broken site
might send, and what the model computes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedml.data.features import (
    MEAN_KEY,
    SCALE_KEY,
    FeatureStats,
    Standardization,
    check_observed,
    unscaled_features,
)
from fedml.errors import FedmlError
from fedml.models import logreg, mlp, with_standardization

# Raw clinical-looking values (up to 1e4) with missing values (NaN) here and there.
values = st.floats(-1e4, 1e4, allow_nan=False, width=32) | st.just(np.nan)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 5).flatmap(
        lambda width: st.lists(
            hnp.arrays(np.float64, st.tuples(st.integers(1, 12), st.just(width)), elements=values),
            min_size=1,
            max_size=5,
        )
    )
)
def test_the_sites_combined_statistics_are_the_pooled_rows_statistics(sites):
    """Adding the sites' counts and sums gives the pooled rows' mean and (population)
    standard deviation per feature, NaN ignored, whatever the split."""
    total = FeatureStats.of_rows(sites[0])
    for rows in sites[1:]:
        total = total + FeatureStats.of_rows(rows)
    pooled = np.concatenate(sites)
    assert total.rows == len(pooled)
    np.testing.assert_array_equal(total.observed, (~np.isnan(pooled)).sum(axis=0))
    seen = total.observed > 0
    if not seen.any():
        return
    result = Standardization.from_stats(total)
    with warnings.catch_warnings():  # a column of NaN only: NumPy warns, gives NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, std = np.nanmean(pooled, axis=0), np.nanstd(pooled, axis=0)
    np.testing.assert_allclose(result.mean[seen], mean[seen], rtol=1e-9, atol=1e-9)
    spread = seen & (std > 1e-3 * np.maximum(np.abs(mean), 1))  # clearly not constant
    np.testing.assert_allclose(result.scale[spread], std[spread], rtol=1e-6)
    assert (result.scale > 0).all()


def test_a_constant_feature_is_centred_not_blown_up():
    rows = np.array([[0.1, 1.0], [0.1, 2.0], [0.1, 3.0]] * 7)
    result = Standardization.from_stats(FeatureStats.of_rows(rows))
    assert result.scale[0] == 1.0 and result.mean[0] == pytest.approx(0.1)
    assert result.scale[1] == pytest.approx(np.std([1.0, 2.0, 3.0]))


def test_a_feature_no_site_observed_is_one_clear_error():
    stats = FeatureStats.of_rows(np.array([[1.0, np.nan], [2.0, np.nan]]))
    with pytest.raises(FedmlError, match=r"Feature.*chol have no value at any site"):
        check_observed(stats, ["age", "chol"])


def test_statistics_travel_as_metrics_and_come_back_equal():
    stats = FeatureStats.of_rows(np.array([[50.0, 1.0], [61.0, np.nan], [45.0, 0.0]]))
    back = FeatureStats.from_metrics(stats.to_metrics(), num_features=2)
    assert back.rows == 3
    np.testing.assert_array_equal(back.observed, [3, 2])
    np.testing.assert_array_equal(back.sums, stats.sums)
    np.testing.assert_array_equal(back.squares, stats.squares)


GOOD = {"rows": 3, "observed": [3, 2], "sums": [156.0, 1.0], "squares": [8246.0, 1.0]}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"rows": None}, "lack"),
        ({"rows": 0}, "row count"),
        ({"rows": 10**13}, "row count"),
        ({"rows": 3.0}, "row count"),
        ({"sums": [1.0]}, "list of 2 numbers"),
        ({"sums": "156,1"}, "list of 2 numbers"),
        ({"sums": [float("nan"), 1.0]}, "NaN or infinite"),
        ({"squares": [float("inf"), 1.0]}, "NaN or infinite"),
        ({"observed": [4, 2]}, "whole numbers 0 .. rows"),
        ({"observed": [-1, 2]}, "whole numbers"),
        ({"observed": [2.5, 2]}, "whole numbers"),
        ({"squares": [-1.0, 1.0]}, "cannot come from real values"),
        ({"sums": [1e6, 1.0]}, "cannot come from real values"),  # mean 3e5, squares too small
    ],
)
def test_a_broken_or_lying_statistics_reply_is_refused_naming_the_fault(change, fragment):
    metrics = {**GOOD, **change}
    metrics = {k: v for k, v in metrics.items() if v is not None}
    with pytest.raises(ValueError, match=fragment):
        FeatureStats.from_metrics(metrics, num_features=2)
    FeatureStats.from_metrics(GOOD, num_features=2)  # the unchanged reply is fine


def test_the_standardisation_travels_in_a_message_config_exactly():
    result = Standardization(np.array([246.26, 0.1 + 0.2]), np.array([51.83, 1.0]))
    config = result.to_config()
    back = Standardization.from_config(config)
    np.testing.assert_array_equal(back.mean, result.mean)
    np.testing.assert_array_equal(back.scale, result.scale)
    assert Standardization.from_config({"server-round": 1}) is None


@pytest.mark.parametrize(
    "config",
    [
        {MEAN_KEY: [1.0, 2.0], SCALE_KEY: [1.0]},
        {MEAN_KEY: [1.0], SCALE_KEY: [0.0]},
        {MEAN_KEY: [float("nan")], SCALE_KEY: [1.0]},
        {MEAN_KEY: []},
    ],
)
def test_a_broken_standardisation_in_a_message_is_one_clear_error(config):
    with pytest.raises(FedmlError, match=MEAN_KEY.split("-")[0]):
        Standardization.from_config(config)


def test_the_model_takes_raw_rows_and_imputes_missing_values_with_the_mean():
    torch.manual_seed(0)
    plain = mlp((3,), 2, hidden=4)
    wrapped = mlp((3,), 2, hidden=4)
    wrapped.load_state_dict(plain.state_dict())
    mean, scale = np.array([50.0, 240.0, 1.0]), np.array([10.0, 40.0, 2.0])
    with_standardization(wrapped, Standardization(mean, scale))
    raw = torch.tensor([[60.0, 200.0, np.nan], [40.0, np.nan, 3.0]])
    by_hand = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 0.0, 1.0]])
    torch.testing.assert_close(wrapped(raw), plain(by_hand))
    # the statistics are not weights: nothing that aggregates arrays ever sees them
    assert wrapped.state_dict().keys() == plain.state_dict().keys()
    # a second call replaces the statistics; the input is standardised once, not twice
    with_standardization(wrapped, Standardization(np.zeros(3), np.ones(3)))
    torch.testing.assert_close(wrapped(by_hand), plain(by_hand))


def test_the_model_refuses_rows_of_another_width_by_name():
    model = with_standardization(logreg((3,), 2), Standardization(np.zeros(3), np.ones(3)))
    with pytest.raises(FedmlError, match="standardises 3 features but these examples have 4"):
        model(torch.zeros(2, 4))


def test_unscaled_features_are_found_and_scaled_ones_are_not():
    rng = np.random.default_rng(0)
    rows = np.column_stack([rng.normal(0, 1, 200), rng.normal(240, 50, 200), rng.random(200)])
    found = unscaled_features(rows)
    assert [index for index, _, _ in found] == [1]
    assert found[0][1] == pytest.approx(240, abs=10)
    assert unscaled_features(rows[:, [0, 2]]) == []


def test_sums_around_a_shift_keep_the_digits_of_a_feature_far_from_zero():
    """A feature at 1e5 with spread 0.01: plain sums of squares lose it to cancellation;
    sums around the server's shift (its test set's mean) keep it."""
    rng = np.random.default_rng(0)
    rows = (1e5 + 0.01 * rng.standard_normal((400, 1))).astype(np.float64)
    shift = np.array([1e5 + 0.003])
    halves = FeatureStats.of_rows(rows[:150], shift) + FeatureStats.of_rows(rows[150:], shift)
    result = Standardization.from_stats(halves, shift)
    assert result.mean[0] == pytest.approx(rows.mean(), rel=1e-12)
    assert result.scale[0] == pytest.approx(rows.std(), rel=1e-6)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"sums": [1e200, 1.0], "squares": [1e308, 1.0]}, "magnitude exceeds"),
        ({"observed": [0, 2], "sums": [5.0, 1.0]}, "no observed value has sums"),
        ({"rows": True}, "row count"),
    ],
)
def test_statistics_too_large_for_a_model_or_from_nowhere_are_refused(change, fragment):
    with pytest.raises(ValueError, match=fragment):
        FeatureStats.from_metrics({**GOOD, **change}, num_features=2)


def test_combined_statistics_a_model_cannot_use_are_one_clear_error():
    huge = FeatureStats(1, np.array([1.0]), np.array([1e31]), np.array([1e62]))
    with pytest.raises(FedmlError, match="not finite numbers a model can use"):
        Standardization.from_stats(huge + huge)


def test_the_model_standardises_an_empty_batch():
    """DP-SGD's Poisson sampling draws empty batches; the hook must pass them through."""
    model = with_standardization(logreg((3,), 2), Standardization(np.zeros(3), np.ones(3)))
    assert model(torch.zeros(0, 3)).shape == (0, 2)


def test_a_site_claiming_many_rows_is_capped_like_a_training_claim():
    from fedml.preprocessing import _capped_total

    honest = [FeatureStats.of_rows(np.full((100, 1), v)) for v in (1.0, 2.0, 3.0)]
    liar = FeatureStats.of_rows(np.full((100, 1), 1000.0)).scaled(1e7)  # "10^9 rows"
    total = _capped_total([*honest, liar], max_weight_factor=10)
    assert total.rows == 300 + 1000  # the liar weighs 10 x the median of the others
    mean = Standardization.from_stats(total).mean[0]
    assert mean == pytest.approx((100 + 200 + 300 + 1000 * 1000) / 1300)
    uncapped = Standardization.from_stats(_capped_total([*honest, liar], 0)).mean[0]
    assert uncapped > 999  # what the cap prevents: the liar alone sets the mean


def test_a_spread_too_small_for_float32_counts_as_constant_and_is_refused_in_a_message():
    stats = FeatureStats(3, np.array([3.0]), np.array([0.0]), np.array([1e-300]))
    assert Standardization.from_stats(stats).scale[0] == 1.0  # not 3e-151, which is 0 in float32
    with pytest.raises(FedmlError, match="preprocess-scale"):
        Standardization.from_config({MEAN_KEY: [0.0], SCALE_KEY: [1e-40]})
