"""A site's state folder belongs to one site (fedml.deploy.site_state), and a failed
task's reason travels without the site's paths (fedml.failures)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
from flwr.app import Error
from hypothesis import given
from hypothesis import strategies as st

from fedml.deploy.site_state import (
    IDENTITY_FILE,
    claim,
    default_state_dir,
    key_fingerprint,
    site_name,
)
from fedml.errors import FedmlError
from fedml.failures import (
    MAX_REASON_CHARS,
    MAX_REASONS,
    OTHER_REASON,
    failure_reason,
    without_paths,
)
from fedml.pki import add_node, init_pki


@pytest.fixture
def sites(tmp_path):
    pki = tmp_path / "pki"
    init_pki(pki)
    for name in ("hospital-a", "hospital-b"):
        add_node(pki, name)
    return pki / "sites"


def test_two_sites_started_from_one_folder_get_their_own_state_folders(sites, tmp_path):
    a, b = sites / "hospital-a", sites / "hospital-b"
    assert default_state_dir(site_name(a, tmp_path / "x.npz")) == default_state_dir("hospital-a")
    assert str(default_state_dir(site_name(a, tmp_path / "x.npz"))) == "fedml-site-hospital-a"
    assert site_name(b, tmp_path / "x.npz") == "hospital-b"
    assert site_name(None, tmp_path / "client-1.npz") == "client-1"  # --insecure
    assert key_fingerprint(a) != key_fingerprint(b)
    assert key_fingerprint(a).startswith("sha256:") and key_fingerprint(None) == "insecure"


def test_a_second_client_on_a_state_folder_is_refused_at_once_naming_state_dir(tmp_path):
    data = tmp_path / "a.npz"
    data.write_bytes(b"x")
    state = tmp_path / "state"
    with claim(state, "insecure", data):
        with (
            pytest.raises(FedmlError, match=r"in use by another fedml client.*--state-dir"),
            claim(state, "insecure", data),
        ):
            pass
        # another process too (the lock is the file's, not this process's)
        probe = textwrap.dedent(f"""
            from pathlib import Path
            from fedml.deploy.site_state import claim
            from fedml.errors import FedmlError
            try:
                with claim(Path({str(state)!r}), "insecure", Path({str(data)!r})):
                    print("claimed")
            except FedmlError as exc:
                print(exc)
        """)
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert "in use by another fedml client" in out.stdout, out.stderr
    with claim(state, "insecure", data):  # let go when the client ends
        pass


def test_a_state_folder_refuses_another_key_or_another_data_file(sites, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    state = tmp_path / "state"
    key_a, key_b = key_fingerprint(sites / "hospital-a"), key_fingerprint(sites / "hospital-b")
    with claim(state, key_a, a):
        pass
    assert (state / IDENTITY_FILE).is_file()
    with (
        pytest.raises(FedmlError, match=r"belongs to another site.*own --state-dir"),
        claim(state, key_b, a),
    ):
        pass
    with (
        pytest.raises(FedmlError, match=re.escape(f"serves the data {a}, not {b}")),
        claim(state, key_a, b),
    ):
        pass
    with claim(state, key_a, tmp_path / "." / "a.npz"):  # the same file, spelled otherwise
        pass
    (state / IDENTITY_FILE).write_text("{not json")
    with pytest.raises(FedmlError, match="damaged"), claim(state, key_a, a):
        pass


def test_a_reason_loses_the_sites_paths_but_keeps_the_file_name():
    text = "FedmlError: /srv/hospital-a/2026/visits.csv, line 3: 'x' is not a number"
    assert without_paths(text) == "FedmlError: <visits.csv>, line 3: 'x' is not a number"
    assert without_paths("[Errno 2] No such file: '/home/alice/d.npz'") == (
        "[Errno 2] No such file: '<d.npz>'"
    )
    assert without_paths(r"C:\Users\bob\x.csv and ~/data/y.npz") == "<x.csv> and <y.npz>"
    assert without_paths("loss 1/2 and a/b stay") == "loss 1/2 and a/b stay"


@given(
    st.lists(st.text("abcxyz-_.0123456789", min_size=1, max_size=8), min_size=1, max_size=5),
    st.text(max_size=40),
)
def test_no_directory_of_an_absolute_path_survives(parts, around):
    path = "/" + "/".join(["secret-dir", *parts])
    cleaned = without_paths(f"{around} {path} {around}")
    assert "secret-dir" not in cleaned


def test_a_failure_reason_is_one_bounded_printable_line():
    assert failure_reason(Error(code=0, reason="a\nb\x00c  d")) == "a b?c d"
    assert failure_reason(Error(code=7, reason="")) == "error code 7"
    long = failure_reason(Error(code=0, reason="x" * 10_000))
    assert len(long) == MAX_REASON_CHARS and long.endswith("...")


def test_a_round_keeps_a_bounded_number_of_distinct_reasons():
    from fedml.validation import Tally

    tally = Tally()
    for i in range(MAX_REASONS + 5):
        assert not tally.answered(_error_reply(Error(code=0, reason=f"reason {i}")))
    assert tally.failed == MAX_REASONS + 5
    assert len(tally.failed_reasons) == MAX_REASONS + 1
    assert tally.failed_reasons[OTHER_REASON] == 5


def _error_reply(error: Error):
    class Reply:  # what Tally reads of a reply
        def has_error(self) -> bool:
            return True

    reply = Reply()
    reply.error = error
    return reply


def test_an_earlier_fedmls_shared_state_folder_is_never_silently_left_behind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(default_state_dir("hospital-a")) == "fedml-site-hospital-a"
    (tmp_path / "fedml-site").mkdir()  # holds an upgraded site's privacy ledger
    with pytest.raises(FedmlError, match=r"--state-dir fedml-site, or rename it"):
        default_state_dir("hospital-a")
