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


# ------------------------------------------------------------------ a run's own trail
def test_a_run_keeps_a_trail_of_its_start_joins_commits_and_resume(tmp_path):
    from fedml.config import experiment_digest, load_config
    from fedml.runstore import open_resume
    from simulations.engine import simulate

    run = tmp_path / "run"
    quick = {"simulation.clients": 3, "client.local_epochs": 1, "out": str(run)}
    cfg = load_config(None, {**quick, "rounds": 2})
    simulate(cfg)
    store, resumed = open_resume(run, {"rounds": 3})
    simulate(resumed, resume=store)
    verdict = audit.verify(run)
    assert verdict.ok
    events = [(e["event"], e.get("round")) for e in verdict.entries]
    assert events == [
        ("start", None), ("join", None), ("commit", 1), ("commit", 2),
        ("resume", None), ("join", None), ("commit", 3),
    ]  # fmt: skip
    start, join, *_ = verdict.entries
    assert start["experiment"] == experiment_digest(cfg) and start["after_round"] == 0
    assert join["nodes"] == [1, 2, 3] and join["count"] == 3
    assert verdict.entries[4]["after_round"] == 2
    commits = [e for e in verdict.entries if e["event"] == "commit"]
    checkpoint, _ = store.latest_valid()
    assert checkpoint is not None and checkpoint.round == 3
    assert commits[-1]["model"] == audit.arrays_digest(checkpoint.arrays)
    assert len({c["model"] for c in commits}) == 3  # each round committed a new model
    assert commits[-1]["stop"] == "max rounds" and commits[0]["aggregated"] == 3
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [c["server"]["accuracy"] for c in commits] == [r["server"]["accuracy"] for r in rows]


def test_a_rounds_failures_are_in_the_run_trail_by_reason(tmp_path):
    import math

    from flwr.app import ArrayRecord

    from fedml.run_audit import RunTrail, describe

    trail = RunTrail(tmp_path)
    trail.seen([1, 2, 3])
    trail.seen([1, 3, 4])
    row = {
        "round": 4,
        "clients": {"aggregated": 0, "declined": 1},
        "failed_reasons": {"site b: refused by the site's policy (privacy.require): ...": 2},
        "train": {"loss": math.nan, "num-examples": 10},
        "discarded": "too few updates",
    }
    trail.committed(row, ArrayRecord(), stop_reason=None)
    entries = audit.verify(tmp_path).entries
    assert [e["event"] for e in entries] == ["join", "join", "left", "failures", "commit"]
    assert entries[1]["nodes"] == [4] and entries[2]["nodes"] == [2]
    assert entries[3]["reasons"] == row["failed_reasons"] and entries[3]["declined"] == 1
    assert entries[4]["train"] == {"num-examples": 10}  # a NaN loss is left out, not raised
    assert entries[4]["discarded"] == "too few updates"
    assert "2 x site b: refused by the site's policy" in describe(entries[3])
