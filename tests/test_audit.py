"""The site's audit trail: chained entries, and every kind of tampering named."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedml import audit
from fedml.errors import FedmlError


def _trail(folder: Path, count: int = 5) -> list[dict]:
    return [
        audit.append(folder, {"event": "task", "round": i, "outcome": "done"}) for i in range(count)
    ]


def _lines(folder: Path) -> list[str]:
    return (folder / audit.TRAIL).read_text().splitlines(keepends=True)


def _write(folder: Path, lines: list[str]) -> None:
    (folder / audit.TRAIL).write_text("".join(lines))


def test_an_untouched_trail_verifies_and_chains_every_entry(tmp_path):
    written = _trail(tmp_path)
    verdict = audit.verify(tmp_path)
    assert verdict.ok and verdict.entries == written
    assert [e["n"] for e in written] == [1, 2, 3, 4, 5]
    assert written[0]["prev"] == audit.GENESIS
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(written))
    assert verdict.head == (5, written[-1]["hash"])
    assert audit.verify(tmp_path / audit.TRAIL).ok  # the file itself names it too


def _edit(lines: list[str]) -> list[str]:
    entry = json.loads(lines[2])
    entry["outcome"] = "refused"  # a changed fact, hash left as it was
    return [*lines[:2], json.dumps(entry, sort_keys=True) + "\n", *lines[3:]]


def _rehash(lines: list[str]) -> list[str]:
    entry = json.loads(lines[2])
    entry["outcome"] = "refused"
    entry["hash"] = audit.entry_hash(entry)  # a careful forger: its own hash fixed
    return [*lines[:2], json.dumps(entry, sort_keys=True) + "\n", *lines[3:]]


TAMPERING = {
    "edited": (_edit, "entry 3: was edited"),
    "edited and rehashed": (_rehash, "entry 4: does not follow the entry before it"),
    "deleted": (lambda lines: lines[:2] + lines[3:], "entry 3: is numbered 4"),
    "reordered": (
        lambda lines: [*lines[:1], lines[2], lines[1], *lines[3:]],
        "entry 2: is numbered 3",
    ),
    "tail cut": (lambda lines: lines[:3], "the trail ends at entry 3 but 5 were written"),
    "cut mid-line": (lambda lines: [*lines[:4], lines[4][:30]], "entry 5: is incomplete"),
    "garbage line": (lambda lines: [*lines[:1], "{not json\n", *lines[2:]], "entry 2: is not JSON"),
}


@pytest.mark.parametrize("kind", list(TAMPERING))
def test_each_kind_of_tampering_is_named_with_the_first_bad_entry(tmp_path, kind):
    _trail(tmp_path)
    tamper, fragment = TAMPERING[kind]
    _write(tmp_path, tamper(_lines(tmp_path)))
    verdict = audit.verify(tmp_path)
    assert not verdict.ok and fragment in verdict.problem


def test_a_whole_trail_rewritten_with_a_new_head_is_caught_by_a_kept_head(tmp_path):
    """Rewriting every entry and the head passes the chain, so `fedml audit verify`
    prints the head for keeping elsewhere: against it the rewrite shows."""
    _trail(tmp_path)
    kept = audit.verify(tmp_path).head
    lines = _lines(tmp_path)
    rewritten, previous = [], audit.GENESIS
    for line in lines:
        entry = json.loads(line)
        entry["outcome"], entry["prev"] = "refused", previous
        entry["hash"] = previous = audit.entry_hash(entry)
        rewritten.append(json.dumps(entry, sort_keys=True) + "\n")
    _write(tmp_path, rewritten)
    (tmp_path / audit.HEAD).write_text(f"5 {previous}\n")
    verdict = audit.verify(tmp_path)
    assert verdict.ok and verdict.head != kept


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.data())
def test_any_single_changed_byte_is_detected(count, data):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _trail(folder, count)
        raw = bytearray((folder / audit.TRAIL).read_bytes())
        index = data.draw(st.integers(0, len(raw) - 1))
        replacement = data.draw(st.integers(0, 255).filter(lambda b: b != raw[index]))
        raw[index] = replacement
        (folder / audit.TRAIL).write_bytes(bytes(raw))
        assert not audit.verify(folder).ok


def test_a_writer_that_stopped_between_its_two_writes_leaves_a_trail_that_goes_on(tmp_path):
    """Killed after the entry, before the head: the trail verifies and the next append
    follows it. Killed mid-line: the next append cuts the unacknowledged line off."""
    _trail(tmp_path, 3)
    head = (tmp_path / audit.HEAD).read_text()
    audit.append(tmp_path, {"event": "task", "round": 3})
    (tmp_path / audit.HEAD).write_text(head)  # the head as before the 4th entry
    assert audit.verify(tmp_path).ok
    audit.append(tmp_path, {"event": "task", "round": 4})
    with open(tmp_path / audit.TRAIL, "a") as handle:
        handle.write('{"n": 6, "half')
    assert not audit.verify(tmp_path).ok
    audit.append(tmp_path, {"event": "task", "round": 5})
    verdict = audit.verify(tmp_path)
    assert verdict.ok and [e["n"] for e in verdict.entries] == [1, 2, 3, 4, 5, 6]


def test_concurrent_writers_keep_one_chain(tmp_path):
    threads = [threading.Thread(target=_trail, args=(tmp_path, 10)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    verdict = audit.verify(tmp_path)
    assert verdict.ok and len(verdict.entries) == 40


def test_an_event_may_not_set_the_chain_fields_and_a_missing_trail_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="may not set"):
        audit.append(tmp_path, {"hash": "0" * 64})
    with pytest.raises(FedmlError, match="holds no audit trail"):
        audit.verify(tmp_path / "nowhere")


def test_the_cli_verifies_and_shows_a_trail(tmp_path):
    _trail(tmp_path, 3)

    def fedml(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "fedml.cli", "audit", *args, str(tmp_path)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    ok = fedml("verify")
    assert ok.returncode == 0 and "intact: 3 entries" in ok.stdout
    shown = fedml("show")
    assert shown.returncode == 0 and "done" in shown.stdout and "intact" in shown.stdout
    _write(tmp_path, _lines(tmp_path)[:2])
    bad = fedml("verify")
    assert bad.returncode == 1 and "TAMPERED: the trail ends at entry 2 but 3" in bad.stdout
