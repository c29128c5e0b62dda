"""Secure aggregation's building blocks (fedml/secagg): the sum comes back exactly, no
single input does, dropouts up to the threshold are recovered, lies are caught."""

from __future__ import annotations

import os

import numpy as np
import pytest
from flwr.app import ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from fedml.arrays import from_numpy, record_of, to_numpy
from fedml.secagg import crypto
from fedml.secagg import messages as wire
from fedml.secagg.encoding import Layout, decode, encode
from fedml.secagg.protocol import (
    HostileSite,
    RoundPlan,
    SecAggFailure,
    ServerSecAgg,
    SiteSecAgg,
)
from strategies.aggregate import WeightedMean

SIZE = 12


class BadDealer(SiteSecAgg):
    """A hostile site: it deals random shares of its self-mask seed (or, `of_key`, of
    its mask key), each with a digest that matches, so no holder can tell."""

    of_key = False

    def share(self, plan, keys):
        import fedml.secagg.crypto as crypto_module

        honest = crypto_module.split_secret
        calls = []

        def bad(secret, threshold, count):
            shares = honest(secret, threshold, count)
            calls.append(1)
            if (len(calls) == 2) is self.of_key:  # the seed is split first, the key second
                return [share[:8] + os.urandom(len(share) - 8) for share in shares]
            return shares

        crypto_module.split_secret = bad
        try:
            return super().share(plan, keys)
        finally:
            crypto_module.split_secret = honest


def _round(sites, threshold, neighbours, inputs, answering, tamper=None, liar=None, dealers=None):
    """Play one round; `answering`: sites that send masked input (the rest drop out
    after sharing); `dealers`: site -> its class (hostile ones). Returns the unmasked
    sum."""
    dealers = dealers or {}
    parties = {v: dealers.get(v, SiteSecAgg)(v, server_round=7) for v in sites}
    server = ServerSecAgg(7, threshold, neighbours)
    plan, keys = server.holder_keys({v: p.advertise() for v, p in parties.items()})
    inbox = server.route({v: parties[v].share(plan, keys[v]) for v in plan.sampled})
    if tamper is not None:  # the server (or the network) changes one ciphertext
        receiver, sender = tamper
        sealed = bytearray(inbox[receiver][sender])
        sealed[-1] ^= 1
        inbox[receiver][sender] = bytes(sealed)
    for v in answering:
        server.add(v, parties[v].masked(inputs[v], inbox.get(v, {})))
    answers = {v: parties[v].unmask(server.survivors, server.dropped) for v in answering}
    if liar is not None:
        answers[liar] = {site: os.urandom(len(share)) for site, share in answers[liar].items()}
    return server.unmask(answers)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(3, 8).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.sampled_from([0, 2, 4]),
            st.integers(0, 2**32),
        )
    )
)
def test_the_unmasked_sum_is_exactly_the_sum_of_the_inputs_that_arrived(case):
    n, neighbours, seed = case
    rng = np.random.default_rng(seed)
    sites = list(range(1, n + 1))
    plan = RoundPlan(7, tuple(sites), 1, neighbours)
    fewest = min(len(plan.holders(v)) for v in sites)
    threshold = int(rng.integers(2, fewest + 1))
    inputs = {v: rng.integers(0, 2**64, SIZE, dtype=np.uint64) for v in sites}
    drop = int(rng.integers(0, n - threshold + 1))  # at most n - threshold drop out
    answering = sorted(rng.choice(sites, n - drop, replace=False).tolist())
    # every site's secret needs `threshold` of its holders among those answering (in a
    # sparse graph a site's few holders may all have dropped: then the round fails)
    recoverable = all(len(set(plan.holders(v)) & set(answering)) >= threshold for v in sites)
    if not recoverable:
        with pytest.raises(SecAggFailure):
            _round(sites, threshold, neighbours, inputs, answering)
        return
    total = _round(sites, threshold, neighbours, inputs, answering)
    expected = np.zeros(SIZE, dtype=np.uint64)
    for v in answering:
        expected += inputs[v]
    assert np.array_equal(total, expected)


def test_too_few_survivors_fail_the_round_and_sites_refuse_to_unmask():
    inputs = {v: np.full(SIZE, v, dtype=np.uint64) for v in range(1, 6)}
    with pytest.raises(SecAggFailure, match="refusing an unsafe unmask request"):
        _round(range(1, 6), 3, 0, inputs, answering=[1, 2])
    parties = {v: SiteSecAgg(v, server_round=1) for v in (1, 2)}
    with pytest.raises(SecAggFailure, match="too few for threshold"):
        ServerSecAgg(1, 3, 0).holder_keys({v: p.advertise() for v, p in parties.items()})


def test_a_lying_site_is_outvoted_and_a_changed_ciphertext_is_left_out():
    inputs = {v: np.arange(SIZE, dtype=np.uint64) * v for v in range(1, 6)}
    expected = sum(inputs[v] for v in (1, 2, 3, 4))
    # 4 answer, threshold 3: one liar (random shares) is caught by the digests
    assert np.array_equal(_round(range(1, 6), 3, 0, inputs, [1, 2, 3, 4], liar=2), expected)
    # a ciphertext changed on the way does not open (AEAD); the other holders suffice
    assert np.array_equal(_round(range(1, 6), 3, 0, inputs, [1, 2, 3, 4], tamper=(1, 5)), expected)
    # threshold 4 of 4 answering: the liar leaves too few valid shares
    with pytest.raises(SecAggFailure, match="valid share"):
        _round(range(1, 6), 4, 0, inputs, [1, 2, 3, 4], liar=2)


class BadKeyDealer(BadDealer):
    of_key = True


@pytest.mark.parametrize(
    ("dealer", "answering", "what"),
    [
        (BadDealer, [1, 2, 3, 4, 5], "self-mask seed"),  # it masks: its seed is rebuilt
        (BadKeyDealer, [1, 3, 4, 5], "mask key"),  # it drops out: its key is rebuilt
    ],
)
def test_a_site_that_deals_shares_of_no_committed_secret_is_named(dealer, answering, what):
    """Issue 34: one hostile site of five ended every secure round ("Failed to combine
    shares"), unnamed. Its shares pass their digests (it made both), but they rebuild
    no secret it committed to: the server names it, and only it."""
    inputs = {v: np.arange(SIZE, dtype=np.uint64) * v for v in range(1, 6)}
    with pytest.raises(HostileSite, match=what) as caught:
        _round(range(1, 6), 3, 0, inputs, answering, dealers={2: dealer})
    assert caught.value.site == 2


def test_a_masked_input_looks_uniform_and_hides_the_input():
    """What the server receives from one site: its high bytes are uniform (chi-square
    against 256 equal bins) whatever the input, here all zeros."""
    parties = {v: SiteSecAgg(v, server_round=1) for v in (1, 2, 3)}
    server = ServerSecAgg(1, 2, 0)
    plan, keys = server.holder_keys({v: p.advertise() for v, p in parties.items()})
    inbox = server.route({v: parties[v].share(plan, keys[v]) for v in plan.sampled})
    zeros = np.zeros(200_000, dtype=np.uint64)
    seen = parties[1].masked(zeros, inbox[1])
    counts = np.bincount((seen >> np.uint64(56)).astype(np.int64), minlength=256)
    expected = len(seen) / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 350  # 255 degrees of freedom: p > 0.0001 for uniform bytes
    assert np.count_nonzero(seen) > len(seen) - 10


def test_the_graph_is_symmetric_with_the_asked_degree():
    plan = RoundPlan(3, tuple(range(1, 21)), 3, 4)
    for v in plan.sampled:
        assert len(plan.neighbours_of(v)) == 4
        assert all(v in plan.neighbours_of(u) for u in plan.neighbours_of(v))
    assert RoundPlan(3, (1, 2, 3), 2, 0).holders(2) == (1, 2, 3)


def test_flowers_shamir_and_our_aead_still_work_as_used():
    """Pins the Flower helper we build on (flwr.common.secure_aggregation)."""
    secret = os.urandom(32)
    shares = crypto.split_secret(secret, 3, 5)
    assert crypto.join_shares(shares[2:]) == secret
    assert crypto.join_shares([shares[0], shares[3], shares[4]]) == secret
    a, b = crypto.private_key(), crypto.private_key()
    key = crypto.agree(a, crypto.public_key(b), b"x")
    assert (
        key
        == crypto.agree(b, crypto.public_key(a), b"x")
        != crypto.agree(b, crypto.public_key(a), b"y")
    )
    sealed = crypto.seal(key, b"share", b"1->2")
    assert crypto.unseal(key, sealed, b"1->2") == b"share"
    with pytest.raises(crypto.ShareTampered):
        crypto.unseal(key, sealed, b"1->3")


dtypes = st.sampled_from([np.float32, np.float64, np.int64])


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(dtypes, st.integers(1, 6)), min_size=1, max_size=3),
    st.lists(st.integers(1, 10_000), min_size=1, max_size=6),
    st.integers(0, 2**32),
    st.sampled_from([12, 16, 24]),
)
def test_decoding_the_sum_is_plain_fedavg_within_one_quantum(layout_spec, weights, seed, bits):
    rng = np.random.default_rng(seed)
    clip = 2.0
    reference = {
        f"a{i}": (rng.normal(size=size) * 3).astype(dtype)
        if dtype != np.int64
        else rng.integers(-50, 50, size).astype(dtype)
        for i, (dtype, size) in enumerate(layout_spec)
    }
    layout = Layout.of(reference, clip, bits)
    trained, total = [], np.zeros(layout.size, dtype=np.uint64)
    for n in weights:
        arrays = {
            k: (v + rng.uniform(-clip, clip, v.shape)).astype(v.dtype)
            if v.dtype != np.int64
            else v + rng.integers(0, 100, v.shape)
            for k, v in reference.items()
        }
        trained.append(arrays)
        total += encode(layout, arrays, reference, n, rng)
    decoded = decode(layout, total, reference)
    mean, count = decoded.arrays, decoded.examples
    assert count == sum(weights) == decoded.weight
    plain = WeightedMean()
    for arrays, n in zip(trained, weights, strict=True):
        plain.add(record_of({k: from_numpy(v) for k, v in arrays.items()}), n)
    expected = {k: to_numpy(a) for k, a in plain.result().items()}
    quantum = 2 * clip / (2**bits - 1)
    for key, value in mean.items():
        assert value.dtype == expected[key].dtype
        if value.dtype == np.int64:
            assert np.array_equal(value, expected[key])
        else:
            tolerance = quantum + 4 * np.finfo(value.dtype).eps * (1 + np.abs(expected[key]))
            assert np.all(np.abs(value - expected[key]) <= tolerance)


def test_a_count_that_would_wrap_the_ring_is_refused():
    layout = Layout.of({"w": np.zeros(3, np.float32)}, 1.0, 16)
    with pytest.raises(ValueError, match="num_examples"):
        encode(layout, {"w": np.zeros(3)}, {"w": np.zeros(3)}, 2**48, np.random.default_rng(0))
    with pytest.raises(ValueError, match="out of range"):
        decode(layout, np.zeros(5, dtype=np.uint64), {"w": np.zeros(3)})


def _shared_parties(count: int, threshold: int):
    parties = {v: SiteSecAgg(v, server_round=1) for v in range(1, count + 1)}
    server = ServerSecAgg(1, threshold, 0)
    plan, keys = server.holder_keys({v: p.advertise() for v, p in parties.items()})
    inbox = server.route({v: parties[v].share(plan, keys[v]) for v in plan.sampled})
    return parties, server, inbox


def test_a_site_masks_once_and_only_under_enough_neighbours_masks():
    """Masking twice would give the server x1 - x2 (same masks); masking with an empty
    inbox would leave only the self-mask, whose seed the unmask step reveals."""
    parties, _, inbox = _shared_parties(4, 3)
    with pytest.raises(SecAggFailure, match="neighbour"):
        parties[1].masked(np.zeros(SIZE, dtype=np.uint64), {})
    parties[2].masked(np.zeros(SIZE, dtype=np.uint64), inbox[2])
    with pytest.raises(SecAggFailure, match="masked already"):
        parties[2].masked(np.ones(SIZE, dtype=np.uint64), inbox[2])
    restored = SiteSecAgg.restore(parties[2].state())  # the flag survives the state
    with pytest.raises(SecAggFailure, match="masked already"):
        restored.masked(np.ones(SIZE, dtype=np.uint64), inbox[2])


def test_a_site_refuses_an_unmask_request_that_could_reveal_an_input():
    parties, _, inbox = _shared_parties(4, 2)
    for v in parties:
        parties[v].masked(np.zeros(SIZE, dtype=np.uint64), inbox[v])
    site = parties[1]
    for survivors, dropped in [
        ({2, 3}, {4}),  # the asked site is not a survivor
        ({1, 2, 99}, set()),  # a site that is not in the round
        ({1, 2}, {2}),  # a site both survived and dropped
    ]:
        with pytest.raises(SecAggFailure, match="unsafe unmask"):
            site.unmask(survivors, dropped)
    assert set(site.unmask({1, 2, 3}, {4})) == {1, 2, 3, 4}


def test_unusable_keys_non_canonical_ids_and_wrapped_weights_are_refused():
    assert not crypto.usable_public_key(bytes(32))  # a low-order point
    assert not crypto.usable_public_key(b"short")
    assert crypto.usable_public_key(crypto.public_key(crypto.private_key()))
    record = ConfigRecord({"3": b"a", "03": b"b", "²": b"c", "x": b"d", "4": 5})
    assert wire.from_node_record(record) == {3: b"a"}

    layout = Layout.of({"w": np.zeros(3, np.float32)}, 1.0, 16)
    rng = np.random.default_rng(0)
    zeros = {"w": np.zeros(3, np.float32)}
    honest = encode(layout, {"w": np.full(3, 0.1, np.float32)}, zeros, 100, rng)
    liar = encode(layout, {"w": np.full(3, 0.9, np.float32)}, zeros, 1, rng)
    liar[-1] = np.uint64(2**64 - 99)  # claims a weight that wraps the sum to 1
    with pytest.raises(ValueError, match="beyond what the summed weights allow"):
        decode(layout, honest + liar, zeros)
