"""Partitioners: pure functions that cover every example exactly once."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedml.data.partition import dirichlet, iid, partition, shards
from fedml.errors import FedmlError

labels_strategy = st.integers(20, 400).flatmap(
    lambda n: st.lists(st.integers(0, 9), min_size=n, max_size=n).map(np.array)
)
specs = st.sampled_from(
    ["iid", "dirichlet:0.1", "dirichlet:0.5", "dirichlet:100", "shards:1", "shards:2"]
)


@settings(max_examples=60, deadline=None)
@given(
    labels=labels_strategy, num_clients=st.integers(1, 8), seed=st.integers(0, 2**31), spec=specs
)
def test_partition_covers_every_example_exactly_once(labels, num_clients, seed, spec):
    parts = partition(labels, num_clients, seed, spec)
    assert len(parts) == num_clients
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))


@settings(max_examples=30, deadline=None)
@given(
    labels=labels_strategy, num_clients=st.integers(1, 8), seed=st.integers(0, 2**31), spec=specs
)
def test_partition_is_a_pure_function(labels, num_clients, seed, spec):
    first = partition(labels, num_clients, seed, spec)
    second = partition(labels.copy(), num_clients, seed, spec)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in iid(np.zeros(103, dtype=int), 10, seed=3)]
    assert max(sizes) - min(sizes) <= 1


def _classes_per_client(labels, parts):
    return np.mean([len(np.unique(labels[p])) for p in parts])


def test_small_dirichlet_alpha_skews_labels():
    labels = np.repeat(np.arange(10), 100)
    skewed = _classes_per_client(labels, dirichlet(labels, 10, 0, alpha=0.05))
    uniform = _classes_per_client(labels, dirichlet(labels, 10, 0, alpha=1000.0))
    assert uniform == 10
    assert skewed < 5


@pytest.mark.parametrize(
    "labels", [np.repeat(np.arange(10), 30), np.zeros(20, dtype=int), np.array([0, 1] * 5)]
)
def test_dirichlet_gives_every_client_some_examples(labels):
    parts = dirichlet(labels, 5, seed=1, alpha=0.01)
    assert min(len(p) for p in parts) >= 2
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


def test_shards_gives_each_client_about_k_classes():
    labels = np.repeat(np.arange(10), 100)
    parts = shards(labels, 10, seed=0, k=2)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    assert [len(p) for p in parts] == [100] * 10


@pytest.mark.parametrize("spec", ["dirichlet", "dirichlet:x", "shards:0", "quantity:3", ""])
def test_bad_specs(spec):
    with pytest.raises(FedmlError, match="is not valid"):
        partition(np.zeros(10, dtype=int), 2, 0, spec)


def test_more_clients_than_examples():
    with pytest.raises(FedmlError, match="cannot share"):
        partition(np.zeros(3, dtype=int), 5, 0, "iid")
