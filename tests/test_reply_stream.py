"""The deployed ServerApp's Grid: replies yielded as they arrive, each once, within the
timeout, without Flower's 3 s pauses."""

from __future__ import annotations

import time
from types import SimpleNamespace

from fedml.reply_stream import PollingGrid


def _reply(to: str) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=to))


class SlowSites:
    """A Grid whose site `b` replies `delay_b` seconds after the push, `a` at once."""

    def __init__(self, delay_b: float) -> None:
        self.delay_b = delay_b
        self.pulled: list[list[str]] = []

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return ["a", "b"]

    def pull_messages(self, message_ids):
        ids = sorted(message_ids)
        self.pulled.append(ids)
        ready = [i for i in ids if i == "a" or time.monotonic() - self.pushed_at >= self.delay_b]
        return [_reply(i) for i in ready]


def test_each_reply_is_yielded_as_it_arrives_and_only_once():
    sites = SlowSites(delay_b=0.5)
    stream = PollingGrid(sites, interval=0.05).send_and_receive([object(), object()])
    first = next(stream)
    assert first.metadata.reply_to_message_id == "a"
    assert len(sites.pulled) == 1  # yielded after the first pull, not after the slow site
    rest = list(stream)
    assert [r.metadata.reply_to_message_id for r in rest] == ["b"]
    assert all(ids == ["b"] for ids in sites.pulled[1:])  # a replied site is not asked again
    # polled every 0.05 s, not every 3 s: about ten pulls while `b` took 0.5 s
    assert len(sites.pulled) >= 5


def test_a_phase_ends_at_its_timeout_with_the_replies_that_came():
    sites = SlowSites(delay_b=60)
    started = time.monotonic()
    replies = list(PollingGrid(sites, interval=0.05).send_and_receive([1, 2], timeout=0.3))
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert 0.3 <= time.monotonic() - started < 5


class OnePushFails(SlowSites):
    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return ["a", None]  # Flower's id for a message it could not push


def test_a_message_that_could_not_be_pushed_is_not_waited_for():
    sites = OnePushFails(delay_b=0)
    replies = list(PollingGrid(sites, interval=0.01).send_and_receive([1, 2], timeout=30))
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert sites.pulled == [["a"]]  # asked for `a` only, once


def test_the_last_pull_comes_after_the_deadline_so_a_reply_in_time_is_kept():
    """The phase's deadline passes while the round loop screens earlier replies: a reply
    that reached the SuperLink meanwhile is still collected."""
    sites = SlowSites(delay_b=0.2)
    stream = PollingGrid(sites, interval=0.05).send_and_receive([1, 2], timeout=0.1)
    first = next(stream)
    time.sleep(0.4)  # the caller is busy with `a` past the deadline; `b` arrives
    rest = list(stream)
    assert [r.metadata.reply_to_message_id for r in (first, *rest)] == ["a", "b"]
