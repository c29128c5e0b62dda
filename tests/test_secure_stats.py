"""Feature statistics under secure aggregation: fixed point in the masks' ring, the sum
unmasked only, equal to the statistics gathered in the clear."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.app import app as fedml_app
from fedml.config import load_config
from fedml.data.features import FeatureStats, secure_units
from fedml.data.heart import read_hospitals
from fedml.runstore import RunStore
from fedml.secagg import fixed_point
from fedml.secagg import messages as wire
from fedml.server import Experiment, run_experiment
from simulations.inprocess import InProcessGrid

HEART = {"data.dataset": "fed-heart-disease", "model.name": "logreg", "rounds": 1}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=3, max_size=3),
        min_size=1,
        max_size=20,
    ),
    st.floats(1e-3, 1e3),
)
def test_the_sum_of_fixed_point_vectors_is_the_sum_of_the_values(sites, spread):
    """Each site's vector in fixed point; their sum mod 2^64 decodes to the sum of the
    values, to within half a unit per site."""
    units = np.full(3, spread * 2.0**-16)
    limit = fixed_point.site_limit(len(sites))
    total = np.zeros(3, dtype=np.uint64)
    for values in sites:
        total += fixed_point.encode(np.array(values), units, limit)  # wraps mod 2^64
    exact = np.sum(np.array(sites, dtype=np.float64), axis=0)
    decoded = fixed_point.decode(total, units)
    assert np.all(np.abs(decoded - exact) <= len(sites) * units / 2 * (1 + 1e-9))


def test_a_value_a_site_may_not_send_is_refused_not_wrapped():
    units = np.ones(2)
    with pytest.raises(ValueError, match="beyond the"):
        fixed_point.encode(np.array([1.0, 2.0**62]), units, fixed_point.site_limit(4))
    with pytest.raises(ValueError, match="beyond the"):
        fixed_point.encode(np.array([np.inf, 0.0]), units, 10)


def _run(tmp_path, name: str, stats_replies: list | None = None, **overrides):
    cfg = load_config(None, {**HEART, **overrides, "out": str(tmp_path / name)})

    def client(message: Message, context) -> Message:
        reply = fedml_app(message, context)
        if stats_replies is not None and message.metadata.message_type.endswith("feature_stats"):
            stats_replies.append((message, reply))
        return reply

    grid = InProcessGrid(client, cfg.simulation.clients, cfg.to_flat())
    store = RunStore.create(tmp_path / name, cfg)
    summary = run_experiment(grid, Experiment.prepare(cfg), store)
    store.close()
    return summary, RunStore.open(tmp_path / name).latest_valid()[0].state["scaling"]


def test_masked_statistics_give_the_standardisation_of_statistics_in_the_clear(tmp_path):
    replies: list = []
    secure, masked = _run(tmp_path, "secure", replies, **{"secagg.enabled": True})
    _, clear = _run(tmp_path, "clear")
    assert secure.history[0]["preprocess"] == {
        "standardized": 13, "sites": 4, "rows": 389, "masked": True
    }  # fmt: skip
    np.testing.assert_allclose(masked["mean"], clear["mean"], rtol=1e-7, atol=1e-6)
    np.testing.assert_allclose(masked["scale"], clear["scale"], rtol=1e-7)
    # what each site sent: a masked vector, never its statistics or their fixed point
    assert len(replies) == 4
    for message, reply in replies:
        assert set(reply.content.keys()) == {"arrays"} and not reply.content.metric_records
        sent = wire.masked_from(reply.content, 1 + 3 * 13)
        assert sent is not None
        config = message.content["config"]
        units = np.asarray(config["secure-units"])
        assert np.array_equal(units, secure_units(np.asarray(units[14:27]) * 2.0**16))
        for hospital in read_hospitals():
            mine = FeatureStats.of_rows(hospital.train.x, np.asarray(config["shift"]))
            plain = fixed_point.encode(mine.to_vector(), units, int(config["secure-limit"]))
            assert not np.array_equal(sent, plain)


def test_a_site_whose_statistics_do_not_fit_is_left_out_of_the_masked_sum(tmp_path, caplog):
    """One hospital's file holds absurd cholesterol values (1e17): in fixed point it would
    wrap the ring, so that site refuses and the sum of the other three is used."""
    shards = tmp_path / "shards"
    shards.mkdir()
    hospitals = read_hospitals()
    for i, hospital in enumerate(hospitals):
        x = hospital.train.x.copy()
        if i == 2:
            x[:, 3] = 1e17
        np.savez(shards / f"client-{i}.npz", x=x, y=hospital.train.y)
    test_x = np.concatenate([h.test.x for h in hospitals])
    np.savez(shards / "test.npz", x=test_x, y=np.concatenate([h.test.y for h in hospitals]))
    overrides = {"data.dataset": f"npz:{shards}", "simulation.clients": 4, "secagg.enabled": True}
    with caplog.at_level(logging.WARNING, logger="fedml.preprocessing"):
        summary, _ = _run(tmp_path, "one-off", **overrides)
    assert summary.history[0]["preprocess"]["sites"] == 3
    assert "do not fit secure aggregation's fixed point" in caplog.text


def _masked_sum(bindings: dict[int, bytes], server_binding: bytes) -> tuple[np.ndarray, ...]:
    """Three sites mask their inputs, each bound to what it was told; the server
    unmasks with its own binding. Returns (the unmasked sum, the true sum)."""
    from fedml.secagg.protocol import ServerSecAgg, SiteSecAgg

    rng = np.random.default_rng(0)
    inputs = {v: rng.integers(0, 1000, 5).astype(np.uint64) for v in (1, 2, 3)}
    parties = {v: SiteSecAgg(v, server_round=0) for v in inputs}
    server = ServerSecAgg(0, threshold=2, neighbours=0)
    plan, keys = server.holder_keys({v: p.advertise() for v, p in parties.items()})
    inbox = server.route({v: parties[v].share(plan, keys[v]) for v in plan.sampled})
    for v, party in parties.items():
        server.add(v, party.masked(inputs[v], inbox.get(v, {}), bindings[v]))
    answers = {v: p.unmask(server.survivors, server.dropped) for v, p in parties.items()}
    return server.unmask(answers, server_binding), sum(inputs.values())


def test_sites_told_different_units_mask_with_masks_that_do_not_cancel():
    """A server that gives one site fine units and the others coarse ones (to read that
    site's statistics off the sum) gets noise: the units enter every pairwise mask."""
    told = fixed_point.binding([1.0, 0.5], 100)
    coarse = fixed_point.binding([1.0, 1e30], 100)
    honest, truth = _masked_sum({1: told, 2: told, 3: told}, told)
    assert np.array_equal(honest, truth)
    singled_out, truth = _masked_sum({1: told, 2: coarse, 3: coarse}, told)
    assert not np.array_equal(singled_out, truth)
    assert (singled_out > 2**40).any()  # uniformly random-looking, not a small sum


@pytest.mark.parametrize(
    ("units", "limit"),
    [
        ([2.0, 1.0, 0.1], 100),  # the counts must be in units of exactly 1
        ([1.0, 1.0, -0.1], 100),
        ([1.0, 1.0, float("nan")], 100),
        ([1.0, 1.0, 0.1], 2**70),  # beyond it, the sum could wrap around
        ([1.0, 1.0, 0.1], 0),
    ],
)
def test_a_site_refuses_units_or_limits_an_honest_server_does_not_send(units, limit):
    with pytest.raises(ValueError, match="not ones fedml sends"):
        fixed_point.check_plan(np.array(units), limit, counts=2)
