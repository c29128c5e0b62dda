"""`fedml certs`: what the files are, who may read them, and the errors."""

from __future__ import annotations

import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedml.errors import FedmlError
from fedml.pki import MAX_DAYS, add_node, init_pki, server_files, site_files


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_makes_a_ca_and_a_server_certificate_it_signed_for_the_hosts(tmp_path):
    init_pki(tmp_path, ["superlink.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if not signed by the CA
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["superlink.example.org", "localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == [
        "10.0.0.5",
        "127.0.0.1",
        "::1",
    ]
    files = server_files(tmp_path)
    assert files.server_cert == tmp_path / "server.crt" and files.node_keys == []


def test_private_keys_are_readable_by_their_owner_only(tmp_path):
    init_pki(tmp_path)
    add_node(tmp_path, "hospital-a")
    for key in ("ca.key", "server.key", "sites/hospital-a/node.key"):
        assert _mode(tmp_path / key) == 0o600, key
    for public in ("ca.crt", "server.crt", "nodes/hospital-a.pub", "sites/hospital-a/ca.crt"):
        assert _mode(tmp_path / public) == 0o644, public


def test_a_site_key_is_an_openssh_p384_pair_in_the_formats_flower_reads(tmp_path):
    init_pki(tmp_path)
    add_node(tmp_path, "hospital-a")
    private = serialization.load_ssh_private_key(
        (tmp_path / "sites/hospital-a/node.key").read_bytes(), None
    )
    public = serialization.load_ssh_public_key((tmp_path / "nodes/hospital-a.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    # the site folder holds the CA certificate and its own key, and nothing of the server's
    assert sorted(p.name for p in (tmp_path / "sites/hospital-a").iterdir()) == [
        "ca.crt",
        "node.key",
    ]
    assert site_files(tmp_path / "sites/hospital-a").node_key.name == "node.key"
    assert [p.name for p in server_files(tmp_path).node_keys] == ["hospital-a.pub"]


def test_nothing_is_overwritten_without_force(tmp_path):
    init_pki(tmp_path)
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(FedmlError, match=r"already exist.*--force"):
        init_pki(tmp_path)
    assert (tmp_path / "ca.key").read_bytes() == before
    add_node(tmp_path, "a")
    key = (tmp_path / "sites/a/node.key").read_bytes()
    with pytest.raises(FedmlError, match="already exist"):
        add_node(tmp_path, "a")
    assert (tmp_path / "sites/a/node.key").read_bytes() == key
    init_pki(tmp_path, force=True)
    assert (tmp_path / "ca.key").read_bytes() != before
    assert _mode(tmp_path / "ca.key") == 0o600


@pytest.mark.parametrize("name", ["", "../evil", "a b", "-x", "x" * 65])
def test_a_site_name_that_is_not_a_plain_name_is_refused(tmp_path, name):
    init_pki(tmp_path)
    with pytest.raises(FedmlError, match="Site name"):
        add_node(tmp_path, name)


def test_bad_pki_folders_are_clear_errors(tmp_path):
    with pytest.raises(FedmlError, match="fedml certs init"):
        add_node(tmp_path / "none", "a")
    with pytest.raises(FedmlError, match=r"lacks ca\.crt, server\.crt, server\.key\. Create them"):
        server_files(tmp_path)
    with pytest.raises(FedmlError, match="neither an IP address nor a DNS name"):
        init_pki(tmp_path / "x", ["bad host"])
    # a server certificate from another CA
    init_pki(tmp_path / "one")
    init_pki(tmp_path / "two")
    (tmp_path / "one/ca.crt").write_bytes((tmp_path / "two/ca.crt").read_bytes())
    with pytest.raises(FedmlError, match="was not issued by the CA"):
        server_files(tmp_path / "one")
    # a key that is not the certificate's
    init_pki(tmp_path / "three")
    (tmp_path / "three/server.key").write_bytes((tmp_path / "two/server.key").read_bytes())
    with pytest.raises(FedmlError, match="does not belong to"):
        server_files(tmp_path / "three")
    # a damaged site key
    add_node(tmp_path / "two", "a")
    (tmp_path / "two/sites/a/node.key").write_text("not a key")
    with pytest.raises(FedmlError, match="not an unencrypted OpenSSH private key"):
        site_files(tmp_path / "two/sites/a")


def test_the_certs_commands(tmp_path):
    def fedml(*args):
        return subprocess.run(
            [sys.executable, "-m", "fedml.cli", *args], capture_output=True, text=True, timeout=60
        )

    made = fedml("certs", "init", str(tmp_path / "pki"), "--host", "10.1.2.3")
    assert made.returncode == 0, made.stderr
    assert str(tmp_path / "pki" / "server.key") in made.stdout
    added = fedml("certs", "add-node", "site-1", "--pki", str(tmp_path / "pki"))
    assert added.returncode == 0, added.stderr
    assert f"copy {tmp_path / 'pki' / 'sites' / 'site-1'} to the site" in " ".join(
        added.stdout.split()
    )
    again = fedml("certs", "init", str(tmp_path / "pki"))
    assert again.returncode == 2 and "--force" in again.stderr


@pytest.mark.parametrize("days", [0, MAX_DAYS + 1, 3_000_000, 1_000_000_000])
def test_a_certificate_lifetime_outside_x509s_calendar_is_refused_before_anything_is_written(
    tmp_path, days
):
    with pytest.raises(FedmlError, match=f"--days must be between 1 and {MAX_DAYS}"):
        init_pki(tmp_path / "pki", days=days)
    assert not (tmp_path / "pki").exists() or not any((tmp_path / "pki").iterdir())


def test_the_longest_lifetime_still_makes_a_certificate(tmp_path):
    init_pki(tmp_path / "pki", days=MAX_DAYS)
    cert = x509.load_pem_x509_certificate((tmp_path / "pki" / "server.crt").read_bytes())
    assert cert.not_valid_after_utc.year >= 2026 + 99
