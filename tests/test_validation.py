"""Update validation: every reject reason, the norm check, clipping, streaming."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from hypothesis import given
from hypothesis import strategies as st
from replies import replies_from

from fedml.validation import (
    ScreeningMemory,
    SortedValues,
    Tally,
    UpdateValidator,
    medians_of_the_others,
    site_medians,
)

GLOBAL = {"w": np.zeros((4, 3), dtype=np.float32), "steps": np.array(5, dtype=np.int64)}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _update(scale: float, seed: int = 0) -> dict[str, np.ndarray]:
    """A global model moved by a random direction of norm `scale`."""
    direction = np.random.default_rng(seed).normal(size=(4, 3))
    w = (direction / np.linalg.norm(direction) * scale).astype(np.float32)
    return {"w": w, "steps": np.array(7, dtype=np.int64)}


def _content(arrays: dict[str, np.ndarray] | None, metrics: dict | None = None) -> RecordDict:
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = _record(arrays)
    content["metrics"] = MetricRecord(
        metrics if metrics is not None else {"loss": 0.5, "num-examples": 10}
    )
    return content


def _screen(validator: UpdateValidator, replies: list[Message]) -> tuple[list[int], Tally]:
    tally = Tally()
    accepted = validator.screen(replies, _record(GLOBAL), tally)
    return [m.metadata.src_node_id for m in accepted], tally


HONEST = [_content(_update(1.0 + 0.1 * i, seed=i)) for i in range(4)]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (_content(None), "malformed"),
        (_content(_update(1.0), {"loss": 0.5}), "num-examples"),
        (_content(_update(1.0), {"loss": 0.5, "num-examples": 0}), "num-examples"),
        (_content(_update(1.0), {"loss": 0.5, "num-examples": float("nan")}), "num-examples"),
        (_content(_update(1.0), {"loss": float("inf"), "num-examples": 10}), "metrics"),
        (_content({"w": GLOBAL["w"]}), "keys"),
        (_content({**_update(1.0), "extra": np.ones(2, dtype=np.float32)}), "keys"),
        (_content({**_update(1.0), "w": np.zeros((3, 4), dtype=np.float32)}), "shape"),
        (_content({**_update(1.0), "w": np.zeros((4, 3), dtype=np.float64)}), "shape"),
        (_content({**_update(1.0), "w": np.full((4, 3), np.nan, dtype=np.float32)}), "non-finite"),
    ],
)
def test_each_bad_reply_is_rejected_with_its_reason(bad, reason):
    accepted, tally = _screen(UpdateValidator(), replies_from([*HONEST, bad]))
    assert accepted == [1, 2, 3, 4]
    assert tally.rejected == {reason: 1}
    assert (tally.replied, tally.failed, tally.accepted) == (5, 0, 4)


def _hostile(**fields) -> RecordDict:
    """An honest reply whose array "w" is replaced by one with hostile `fields`
    (dtype, shape, stype, data), as a site may send over the wire."""
    honest = Array(_update(1.0)["w"])
    values = {"dtype": honest.dtype, "shape": honest.shape, "stype": honest.stype}
    values["data"] = honest.data
    values.update(fields)
    content = _content(_update(1.0))
    content["arrays"]["w"] = Array(**values)
    return content


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        # pickle bytes behind an object dtype: never decoded (NumPy would refuse anyway);
        # malformed, not a shape mismatch (issue 34 counted it as "shape")
        (_hostile(dtype="object", data=b"\x93NUMPY\x01\x00" + b"\x80\x04K\x01."), "malformed"),
        (_hostile(dtype="<U8"), "malformed"),
        (_hostile(dtype="not a dtype"), "malformed"),
        (_hostile(stype="torch.raw"), "malformed"),
        (_hostile(data=b"\x93NUMPY\x01\x00{'descr': garbage" + b"\x00" * 64), "malformed"),
        (_hostile(data=b""), "malformed"),
        (_hostile(data=Array(_update(1.0)["w"]).data[:-8]), "malformed"),  # bytes cut short
        (_hostile(shape=(2**40, 2**40)), "shape"),  # compared before anything is allocated
        (_hostile(dtype="float64"), "shape"),
    ],
)
def test_an_array_that_does_not_decode_is_rejected_never_raised(bad, reason):
    accepted, tally = _screen(UpdateValidator(), replies_from([*HONEST, bad]))
    assert accepted == [1, 2, 3, 4]
    assert tally.rejected == {reason: 1}


def test_error_replies_count_as_failed():
    accepted, tally = _screen(UpdateValidator(), replies_from([*HONEST, RuntimeError("down")]))
    assert accepted == [1, 2, 3, 4]
    assert (tally.replied, tally.failed, sum(tally.rejected.values())) == (4, 1, 0)


@pytest.mark.parametrize("position", [0, 1, 2, 5])
def test_a_million_times_larger_update_is_rejected_wherever_it_arrives(position):
    contents = [_content(_update(1.0 + 0.05 * i, seed=i)) for i in range(6)]
    contents.insert(position, _content(_update(1e6, seed=99)))
    accepted, tally = _screen(UpdateValidator(norm_factor=10.0), replies_from(contents))
    hostile = position + 1
    assert accepted == [n for n in range(1, 8) if n != hostile]
    assert tally.rejected == {"norm": 1}


@given(
    norms=st.lists(st.floats(1.0, 2.0), min_size=3, max_size=12),
    position=st.integers(0, 12),
    factor=st.floats(1e3, 1e9),
)
def test_norm_check_keeps_every_similar_update_and_drops_the_outlier(norms, position, factor):
    """Updates within 2x of each other all pass a 10x check; one >= 1000x the largest
    never does, whatever its place in the stream."""
    contents = [_content(_update(n, seed=i)) for i, n in enumerate(norms)]
    position = min(position, len(contents))
    contents.insert(position, _content(_update(2.0 * factor, seed=99)))
    accepted, tally = _screen(UpdateValidator(norm_factor=10.0), replies_from(contents))
    assert accepted == [n for n in range(1, len(contents) + 1) if n != position + 1]
    assert tally.rejected == {"norm": 1}


def test_with_fewer_than_three_valid_updates_there_is_no_norm_check():
    replies = replies_from([_content(_update(1.0)), _content(_update(1e6, seed=1))])
    accepted, tally = _screen(UpdateValidator(norm_factor=10.0), replies)
    assert accepted == [1, 2] and not tally.rejected


def test_norm_factor_zero_turns_the_norm_check_off():
    contents = [*HONEST, _content(_update(1e6, seed=9))]
    accepted, tally = _screen(UpdateValidator(norm_factor=0.0), replies_from(contents))
    assert accepted == [1, 2, 3, 4, 5] and not tally.rejected


def test_clipping_scales_large_updates_to_the_clip_norm_and_keeps_small_ones():
    validator = UpdateValidator(norm_factor=0.0, clip_norm=2.0)
    small, large = _update(1.5, seed=1), _update(8.0, seed=2)
    replies = replies_from([_content(small), _content(large)])
    tally = Tally()
    out = {
        m.metadata.src_node_id: m.content["arrays"]
        for m in validator.screen(replies, _record(GLOBAL), tally)
    }
    np.testing.assert_array_equal(out[1]["w"].numpy(), small["w"])
    clipped = out[2]["w"].numpy()
    assert np.linalg.norm(clipped.astype(np.float64)) == pytest.approx(2.0, rel=1e-6)
    np.testing.assert_allclose(clipped, large["w"] * (2.0 / 8.0), rtol=1e-6)
    assert out[2]["steps"].numpy() == 7  # integer buffers are not scaled
    assert clipped.dtype == np.float32


def test_screening_streams_holding_at_most_fivereplies_from():
    """The validator yields the first accepted update after at most five replies were
    produced (in every round: five judge each other), and each later one right after it
    arrives."""
    produced: list[int] = []
    replies = replies_from([_content(_update(1.0 + 0.1 * i, seed=i)) for i in range(8)])

    def source():
        for reply in replies:
            produced.append(reply.metadata.src_node_id)
            yield reply

    seen_when_yielded = [
        len(produced) for _ in UpdateValidator().screen(source(), _record(GLOBAL), Tally())
    ]
    assert seen_when_yielded == [5, 5, 5, 5, 5, 6, 7, 8]
    produced.clear()
    later_round = UpdateValidator().screen(
        source(), _record(GLOBAL), Tally(), ScreeningMemory(norm_median=1.2)
    )
    assert [len(produced) for _ in later_round] == [5, 5, 5, 5, 5, 6, 7, 8]


def test_evaluation_replies_are_screened_on_their_metrics():
    good: Callable[[float], RecordDict] = lambda a: _content(  # noqa: E731
        None, {"loss": 0.3, "accuracy": a, "num-examples": 5}
    )
    contents = [
        good(0.9),
        _content(None, {"loss": float("nan"), "accuracy": 0.1, "num-examples": 5}),
        _content(None, {"loss": 0.3, "num-examples": -1}),
        RecordDict(),
        good(0.7),
    ]
    tally = Tally()
    valid = UpdateValidator().screen_evaluation(replies_from(contents), tally)
    assert [m.metadata.src_node_id for m in valid] == [1, 5]
    assert tally.rejected == {"metrics": 1, "num-examples": 1, "malformed": 1}


@pytest.mark.parametrize("claim", [0, -3, 10.5, 2**53 + 2, 1.7e308, float("inf")])
def test_a_weight_claim_that_is_not_a_whole_number_of_examples_in_range_is_rejected(claim):
    bad = _content(_update(1.0), {"loss": 0.5, "num-examples": claim})
    accepted, tally = _screen(UpdateValidator(), replies_from([*HONEST, bad]))
    assert accepted == [1, 2, 3, 4] and tally.rejected == {"num-examples": 1}


@pytest.mark.parametrize(("name", "value"), [("accuracy", 5.0), ("accuracy", -0.1), ("loss", -1.0)])
def test_a_metric_outside_its_known_range_is_rejected(name, value):
    bad = _content(_update(1.0), {"loss": 0.5, "num-examples": 10, name: value})
    accepted, tally = _screen(UpdateValidator(), replies_from([*HONEST, bad]))
    assert accepted == [1, 2, 3, 4] and tally.rejected == {"metrics": 1}
    evaluation = UpdateValidator().screen_evaluation(replies_from([bad]), tally := Tally())
    assert evaluation == [] and tally.rejected == {"metrics": 1}


def _weights(messages: list[Message]) -> list[float]:
    return [float(m.content["metrics"]["num-examples"]) for m in messages]


@pytest.mark.parametrize("position", [0, 1, 2, 4, 5])
def test_a_huge_weight_claim_is_capped_wherever_it_arrives(position):
    def contents() -> list[RecordDict]:
        honest = [_content(_update(1.0 + 0.05 * i, seed=i)) for i in range(5)]  # 10 each
        huge = _content(_update(1.0), {"loss": 0.5, "num-examples": 10**12})
        return [*honest[:position], huge, *honest[position:]]

    tally, memory = Tally(), ScreeningMemory(norm_median=1.1, claim_median=10.0)
    screened = UpdateValidator(max_weight_factor=3).screen(
        replies_from(contents()), _record(GLOBAL), tally, memory
    )
    accepted = list(screened)
    assert len(accepted) == 6 and tally.capped == 1
    assert sorted(_weights(accepted)) == [10.0] * 5 + [30.0]  # 3 x the last round's median
    # a run's first round: among the first five it is outvoted by the other four; the
    # sixth meets the median of the first five (issue 34: it was taken whole)
    tally = Tally()
    first_round = UpdateValidator().screen(replies_from(contents()), _record(GLOBAL), tally)
    assert sorted(_weights(list(first_round))) == [10.0] * 5 + [100.0] and tally.capped == 1


@given(
    claims=st.lists(st.integers(1, 2**53), min_size=1, max_size=10),
    median=st.one_of(st.none(), st.floats(0.5, 1e6)),
    factor=st.sampled_from([0.0, 1.0, 3.0, 10.0]),
)
def test_every_accepted_weight_is_its_claim_capped_at_factor_times_the_last_median(
    claims, median, factor
):
    """Whatever the order of arrival: min(claim, factor x the previous round's median
    claim), at least 1; no cap with the factor 0. Without a previous round's claims the
    first five replies are capped against the median of the others among them, and
    later ones against the median of those first."""
    contents = [
        _content(_update(1.0 + 0.01 * i, seed=i), {"loss": 0.5, "num-examples": c})
        for i, c in enumerate(claims)
    ]
    memory = ScreeningMemory(norm_median=1.0, claim_median=median)
    validator = UpdateValidator(max_weight_factor=factor)
    accepted = list(validator.screen(replies_from(contents), _record(GLOBAL), Tally(), memory))
    assert len(accepted) == len(claims)  # similar norms: every update passes
    first = [float(c) for c in claims[:5]]
    references = (
        [median] * len(claims)
        if median is not None
        else medians_of_the_others(first) + [float(np.median(first))] * (len(claims) - 5)
    )
    for message, weight in zip(accepted, _weights(accepted), strict=True):
        index = message.metadata.src_node_id - 1
        claim, reference = claims[index], references[index]
        cap = max(1, math.floor(factor * reference)) if factor and reference else claim
        assert weight == min(claim, cap)
    assert math.isfinite(sum(_weights(accepted)))


def test_evaluation_weights_are_capped_against_all_the_other_claims():
    replies = [_content(None, {"loss": 0.5, "accuracy": 0.9, "num-examples": 10})] * 4
    replies.append(_content(None, {"loss": 0.0, "accuracy": 1.0, "num-examples": 10**9}))
    tally = Tally()
    valid = UpdateValidator().screen_evaluation(replies_from(replies), tally)
    assert sorted(_weights(valid)) == [10.0] * 4 + [100.0] and tally.capped == 1


def test_site_medians_give_each_site_one_vote_whatever_its_claim():
    honest = [
        _content(None, {"loss": 0.5 + i / 10, "accuracy": 0.3, "num-examples": 10})
        for i in range(8)
    ]
    liars = [_content(None, {"loss": 0.0, "accuracy": 1.0, "num-examples": 10**9})] * 2
    valid = UpdateValidator().screen_evaluation(replies_from([*liars, *honest]), Tally())
    medians = site_medians(valid)
    assert medians == {"accuracy": 0.3, "loss": pytest.approx(0.75)}  # num-examples aside
    assert site_medians([]) == {}


def test_two_colluders_replying_first_are_judged_against_the_previous_round_too():
    """Without a memory the first three judge each other, so two x1000 updates among
    them vouch for each other; the previous round's median norm is a vote they do not
    control."""
    colluders = [_content(_update(1000.0, seed=90 + i)) for i in range(2)]
    honest = [_content(_update(1.0 + 0.05 * i, seed=i)) for i in range(6)]
    accepted, tally = _screen(UpdateValidator(), replies_from([*colluders, *honest]))
    assert tally.rejected == {"norm": 2} and accepted == [3, 4, 5, 6, 7, 8]  # first round:
    three = replies_from([*colluders, honest[0]])  # five wait; with three, they would pass
    assert len(list(UpdateValidator().screen(three, _record(GLOBAL), Tally()))) == 3
    memory = ScreeningMemory(norm_median=1.1)
    tally = Tally()
    screened = UpdateValidator().screen(
        replies_from([*colluders, *honest]), _record(GLOBAL), tally, memory
    )
    assert [m.metadata.src_node_id for m in screened] == [3, 4, 5, 6, 7, 8]
    assert tally.rejected == {"norm": 2}
    memory.end_attempt(accepted=True)  # the accepted round's median norm, for the next
    assert memory.norm_median == pytest.approx(np.median([1.0 + 0.05 * i for i in range(6)]))
    assert memory.claim_median == 10.0
    assert memory.state_dict() == {"norm_median": memory.norm_median, "claim_median": 10.0}


def _screened_with_colluders(honest: int, positions: tuple[int, ...]) -> tuple[list[int], Tally]:
    """`honest` similar updates with a x1000 colluder inserted at each of `positions`,
    screened in a round after a remembered one: the accepted nodes, and the tally."""
    contents = [_content(_update(1.0 + 0.05 * i, seed=i)) for i in range(honest)]
    for offset, position in enumerate(positions):
        contents.insert(position, _content(_update(1000.0, seed=90 + offset)))
    tally = Tally()
    screened = UpdateValidator().screen(
        replies_from(contents), _record(GLOBAL), tally, ScreeningMemory(norm_median=1.1)
    )
    return [m.metadata.src_node_id for m in screened], tally


@pytest.mark.parametrize("positions", [(0, 1, 2), (0, 2, 4), (1, 3, 4), (2, 5, 7)])
def test_three_colluders_among_the_first_five_are_outvoted_once_a_round_is_remembered(
    positions,
):
    """Issue 34: three x1000 colluders from round 2 passed the norm screen (the first
    three judged each other). Five wait now: three colluders are not their majority
    with the previous round's median voting too; four would be (README says so)."""
    accepted, tally = _screened_with_colluders(7, positions)
    hostile = {p + 1 for p in positions}
    assert accepted == [n for n in range(1, 11) if n not in hostile]
    assert tally.rejected == {"norm": 3}
    honest = [_content(_update(1.0 + 0.05 * i, seed=i)) for i in range(6)]
    four = [_content(_update(1000.0, seed=90 + i)) for i in range(4)] + honest
    tally = Tally()
    list(UpdateValidator().screen(replies_from(four), _record(GLOBAL), tally, ScreeningMemory(1.1)))
    assert tally.rejected.get("norm", 0) == 0  # the limit: four of the first five


def test_a_discarded_attempt_leaves_the_memory_as_it_was():
    memory = ScreeningMemory(norm_median=2.0)
    list(UpdateValidator().screen(replies_from(HONEST), _record(GLOBAL), Tally(), memory))
    memory.end_attempt(accepted=False)
    assert memory.norm_median == 2.0
    restored = ScreeningMemory()
    restored.load_state_dict(memory.state_dict())
    assert restored == memory


@pytest.mark.parametrize("positions", [(0, 1), (0, 2), (1, 2), (2, 4)])
def test_colluders_anywhere_among_the_first_replies_are_outvoted_by_the_memory(positions):
    accepted, tally = _screened_with_colluders(6, positions)
    hostile = {p + 1 for p in positions}
    assert accepted == [n for n in range(1, 9) if n not in hostile]
    assert tally.rejected == {"norm": 2}


def test_a_first_repliers_huge_claim_is_capped_with_the_norm_check_off():
    huge = _content(_update(1.0), {"loss": 0.5, "num-examples": 10**12})
    tally, memory = Tally(), ScreeningMemory(claim_median=10.0)
    validator = UpdateValidator(norm_factor=0)
    accepted = list(validator.screen(replies_from([huge, *HONEST]), _record(GLOBAL), tally, memory))
    assert sorted(_weights(accepted)) == [10.0] * 4 + [100.0] and tally.capped == 1


def test_an_array_whose_bytes_say_another_dtype_or_shape_than_its_metadata_is_rejected():
    """The bytes are what Flower's own helpers (and so the catalog strategies) decode."""
    import io

    for values in (np.full((4, 3), 10**9, dtype=np.int32), np.ones(12, dtype=np.float32)):
        stream = io.BytesIO()
        np.save(stream, values)
        forged = _hostile(data=stream.getvalue())  # metadata: float32 (4, 3)
        accepted, tally = _screen(UpdateValidator(), replies_from([*HONEST, forged]))
        assert accepted == [1, 2, 3, 4] and tally.rejected == {"malformed": 1}


# ---- medians without a sort per reply (a round may bring many thousand replies) --------
finite = st.floats(-1e300, 1e300, allow_nan=False) | st.integers(0, 10**6).map(float)


@given(st.lists(finite, max_size=40))
def test_the_running_median_is_numpys_median_of_the_values_so_far(values):
    ordered = SortedValues()
    for count, value in enumerate(values):
        assert ordered.median() == (float(np.median(values[:count])) if count else None)
        ordered.add(value)


@given(st.lists(finite, max_size=40))
def test_each_median_of_the_others_is_numpys_median_without_that_value(values):
    expected = [
        float(np.median(values[:i] + values[i + 1 :])) if len(values) > 1 else None
        for i in range(len(values))
    ]
    assert medians_of_the_others(values) == expected


@pytest.mark.parametrize(
    "extra",
    [
        {f"m{i}": 0.5 for i in range(200_000)},  # issue 34: every history row carried them
        {"x" * 65: 0.5},
        {"per-class": [0.5] * 1025},
    ],
    ids=["200,000 metrics", "a 65-character name", "a list of 1,025"],
)
def test_unbounded_metrics_are_rejected_in_training_and_evaluation(extra):
    bloated = {"loss": 0.5, "accuracy": 0.5, "num-examples": 10, **extra}
    accepted, tally = _screen(UpdateValidator(), replies_from([_content(_update(1.0), bloated)]))
    assert accepted == [] and tally.rejected == {"metrics": 1}
    tally = Tally()
    assert UpdateValidator().screen_evaluation(replies_from([_content(None, bloated)]), tally) == []
    assert tally.rejected == {"metrics": 1}
    fine = {"loss": 0.5, "num-examples": 10, **{f"m{i}": 0.5 for i in range(60)}}
    assert len(_screen(UpdateValidator(), replies_from([_content(_update(1.0), fine)]))[0]) == 1


@pytest.mark.parametrize(
    ("extra", "accepted"),
    [
        ({"tp": 2, "fp": 1, "tn": 1, "fn": 1, "sensitivity": 2 / 3, "auroc": 0.8}, True),
        ({"tp": 2, "fp": 1, "tn": 1, "fn": 9}, False),  # counts beyond the example count
        ({"tp": 2, "fp": 1, "tn": 1}, False),  # one count missing
        ({"tp": 2.5, "fp": 0.5, "tn": 1, "fn": 1}, False),  # not whole numbers
        ({"tp": 6, "fp": -1, "tn": 0, "fn": 0}, False),
        ({"sensitivity": 1.5}, False),
        ({"auroc": -0.1}, False),
        ({"balanced_accuracy": 3.0}, False),
    ],
)
def test_clinical_metrics_are_screened_counts_must_add_up_to_the_claim(extra, accepted):
    """A site's confusion counts are summed into the federation's exact rates, so they
    must be whole, complete and add up to its example count (then capped with it);
    rates and AUROC lie in [0, 1]."""
    reply = _content(None, {"loss": 0.3, "accuracy": 0.6, "num-examples": 5, **extra})
    tally = Tally()
    valid = UpdateValidator().screen_evaluation(replies_from([reply]), tally)
    assert (len(valid) == 1) == accepted
    assert tally.rejected == ({} if accepted else {"metrics": 1})
