"""Secure aggregation inside fedml's round loop, played with real ClientApps."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

from fedml.arrays import to_numpy
from fedml.config import load_config
from fedml.errors import FedmlError
from fedml.secagg import messages as wire
from fedml.secure_round import LEFT_OUT
from simulations import engine
from simulations.engine import simulate
from simulations.inprocess import InProcessGrid

DIGITS = {"rounds": 5, "simulation.clients": 5, "validation.clip_norm": 5.0}


def _run(tmp_path, name, **overrides):
    return simulate(load_config(None, {**DIGITS, **overrides, "out": str(tmp_path / name)}))


class Recording(InProcessGrid):
    """The in-process grid, keeping every reply the server receives; optionally failing
    the train replies of some sites (they drop out after sharing their secrets)."""

    received: ClassVar[list] = []
    fail_after_share: ClassVar[set[int]] = set()

    def send_and_receive(self, messages, *, timeout=None):
        for reply in super().send_and_receive(messages, timeout=timeout):
            is_train = reply.metadata.message_type == "train"
            if is_train and reply.metadata.src_node_id in self.fail_after_share:
                continue  # as if the site crashed while training
            Recording.received.append(reply)
            yield reply


@pytest.fixture
def recording(monkeypatch):
    Recording.received, Recording.fail_after_share = [], set()
    monkeypatch.setattr(engine, "InProcessGrid", Recording)
    return Recording


def test_secure_rounds_learn_what_plain_rounds_learn(tmp_path):
    plain = _run(tmp_path, "plain")
    secure = _run(tmp_path, "secure", **{"secagg.enabled": True})
    assert abs(secure.final["server"]["accuracy"] - plain.final["server"]["accuracy"]) <= 0.01
    assert secure.final["train"]["num-examples"] == plain.final["train"]["num-examples"]
    row = secure.final["secagg"]
    assert (row["sampled"], row["shared"], row["unmasked"], row["dropped"]) == (5, 5, 5, 0)
    assert row["threshold"] == 3  # a majority of 5


def test_the_server_only_ever_receives_masked_updates(tmp_path, recording):
    _run(tmp_path, "secure", rounds=2, **{"secagg.enabled": True})
    train = [r for r in recording.received if r.metadata.message_type == "train"]
    assert len(train) == 10
    high_bytes = []
    for reply in train:
        arrays = reply.content.array_records["arrays"]
        assert list(arrays) == [wire.MASKED]  # no model array, no example count
        assert "num-examples" not in next(iter(reply.content.metric_records.values()), {})
        values = to_numpy(arrays[wire.MASKED])
        high_bytes.append((values >> np.uint64(56)).astype(np.int64))
    counts = np.bincount(np.concatenate(high_bytes), minlength=256)
    expected = counts.sum() / 256
    assert float(((counts - expected) ** 2 / expected).sum()) < 350  # uniform bytes
    for reply in recording.received:  # no other message carries model arrays either
        if reply.metadata.message_type != "train":
            assert not reply.content.array_records


def test_sites_that_fail_after_sharing_are_recovered_up_to_the_threshold(tmp_path, recording):
    recording.fail_after_share = {2, 4}  # 2 of 5 drop out after sharing: 3 = threshold
    summary = _run(tmp_path, "two", rounds=2, **{"secagg.enabled": True})
    row = summary.final
    assert (row["secagg"]["unmasked"], row["secagg"]["dropped"]) == (3, 2)
    assert row["clients"]["aggregated"] == 3
    assert row["server"]["accuracy"] > 0.5

    recording.fail_after_share = {1, 2, 4}  # 3 of 5: fewer than the threshold answer
    skipped = _run(
        tmp_path, "three", rounds=1, **{"secagg.enabled": True, "participation.on_too_few": "skip"}
    )
    assert skipped.final["discarded"].startswith("0 update(s) aggregated")


def test_strategies_and_dp_modes_that_need_single_updates_are_refused():
    with pytest.raises(FedmlError, match="strategy 'median' needs them"):
        load_config(None, {"secagg.enabled": True, "strategy.name": "median"})
    with pytest.raises(FedmlError, match=r"Use dp\.mode = 'user-fixed'"):
        load_config(None, {"secagg.enabled": True, "dp.mode": "user-adaptive"})
    with pytest.raises(FedmlError, match=r"secagg\.neighbours"):
        load_config(None, {"secagg.neighbours": 3})
    with pytest.raises(FedmlError, match="one answer would unmask"):
        load_config(None, {"secagg.threshold": 1})


def test_dp_sgd_composes_with_secure_aggregation(tmp_path):
    summary = _run(tmp_path, "dp", rounds=2, **{"secagg.enabled": True, "dp.mode": "sample"})
    assert summary.final["privacy"]["epsilon_max"] > 0
    assert summary.final["secagg"]["unmasked"] == 5


def test_client_level_dp_adds_its_noise_to_the_unmasked_mean_and_accounts_it(tmp_path):
    """`user-fixed` with secure aggregation: each site clips its own update (Flower's
    client-side fixed clipping), the server adds the same noise to the unmasked mean as
    to its own average, so epsilon and the model match the plain run."""
    dp = {"dp.mode": "user-fixed", "dp.noise_multiplier": 0.3, "dp.clip_norm": 0.5}
    plain = _run(tmp_path, "plain", rounds=3, **dp)
    secure = _run(tmp_path, "secure", rounds=3, **dp, **{"secagg.enabled": True})
    assert secure.final["privacy"] == plain.final["privacy"]
    assert secure.final["privacy"]["epsilon"] > 0
    assert abs(secure.final["server"]["accuracy"] - plain.final["server"]["accuracy"]) <= 0.02


class HostileCommitment(InProcessGrid):
    """The in-process grid, with site 2 committing to another self-mask seed than the
    one it shares (its shares all pass their digests): the shape of issue 34's bad
    Shamir shares, as the server sees it."""

    sent: ClassVar[list[set[int]]] = []  # the sites each secure round's keys went to

    def send_and_receive(self, messages, *, timeout=None):
        import os

        from flwr.app import ConfigRecord

        if messages and messages[0].metadata.message_type.endswith(wire.KEYS_ACTION):
            HostileCommitment.sent.append({m.metadata.dst_node_id for m in messages})
        for reply in super().send_and_receive(messages, timeout=timeout):
            shared = reply.metadata.message_type.endswith(wire.SHARE_ACTION)
            if shared and reply.metadata.src_node_id == 2 and not reply.has_error():
                reply.content[wire.COMMITMENT] = ConfigRecord({"seed": os.urandom(32)})
            yield reply


def test_a_site_that_breaks_secure_aggregation_is_named_and_left_out_and_the_run_goes_on(
    tmp_path, monkeypatch
):
    """Issue 34: one hostile site of five ended a secure run at round 1, every retry
    failing the same way. Now its first round's attempt fails naming it, the retry goes
    on without it, and no later round sends it anything."""
    HostileCommitment.sent = []
    monkeypatch.setattr(engine, "InProcessGrid", HostileCommitment)
    summary = _run(tmp_path, "hostile", rounds=3, **{"secagg.enabled": True})
    rows = summary.history
    assert [row["round"] for row in rows] == [1, 2, 3] and summary.stop_reason == "max rounds"
    assert len(rows[0]["retries"]) == 1  # the attempt that proved it hostile
    for row in rows:
        assert row["secagg"]["excluded"] == 1 and row["secagg"]["unmasked"] == 4
        clients = row["clients"]
        assert (clients["aggregated"], clients["failed"], clients["timed_out"]) == (4, 1, 0)
        assert row["failed_reasons"] == {LEFT_OUT: 1}
    assert HostileCommitment.sent[0] == {1, 2, 3, 4, 5}
    assert all(2 not in sites for sites in HostileCommitment.sent[1:])
    assert rows[-1]["server"]["accuracy"] > 0.5
    # committed with the round: a resumed run keeps it out too
    import json

    newest = sorted((tmp_path / "hostile" / "commits").iterdir())[-1]
    hostile = json.loads((newest / "state.json").read_text())["components"]["hostile"]
    assert list(hostile) == ["2"] and "site 2 dealt shares" in hostile["2"]
