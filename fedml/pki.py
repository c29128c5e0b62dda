"""`fedml certs`: the keys and certificates a deployment needs, made with `cryptography`.

One folder (the PKI directory) stays with the server:

    ca.crt            the private CA's certificate: every site gets a copy
    ca.key            the CA's private key (0600): signs the SuperLink certificate
    server.crt        the SuperLink's TLS certificate, for the given host names and IPs
    server.key        its private key (0600)
    nodes/NAME.pub    each site's public authentication key (OpenSSH), which the
                      SuperLink accepts when SuperNode authentication is on
    sites/NAME/       what to copy to the site NAME, and nothing else:
        ca.crt        to verify the SuperLink
        node.key      the site's private authentication key (0600), OpenSSH EC P-384

The formats are the ones Flower 1.42 reads: PEM certificates and keys for the
SuperLink's `--ssl-*` options and the SuperNode's `--root-certificates`, and OpenSSH
NIST-curve EC keys for `--auth-supernode-private-key` and `flwr supernode register`.
Files are never overwritten unless `force` is given; keys are written 0600 from the
start (never readable by others, even for an instant).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedml.errors import FedmlError

MAX_DAYS = 36500  # certificate lifetimes: a hundred years at most
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
NODES, SITES = "nodes", "sites"
NODE_KEY = "node.key"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class ServerFiles:
    """The files `fedml server` needs from a PKI directory."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: list[Path]  # public keys of the sites allowed to connect


@dataclass(frozen=True)
class SiteFiles:
    """The files `fedml client` needs from a site folder."""

    ca_cert: Path
    node_key: Path


def init_pki(
    directory: Path, hosts: list[str] | None = None, days: int = 365, force: bool = False
) -> list[Path]:
    """Create the CA and the SuperLink certificate for `hosts` (plus localhost,
    127.0.0.1 and ::1) in `directory`. Returns the files written."""

    # this machine's own names too: the server's CLI talks to its SuperLink locally
    hosts = list(dict.fromkeys([*(hosts or []), *DEFAULT_HOSTS]))
    names = [_subject_alt_name(h) for h in hosts]
    if not 1 <= days <= MAX_DAYS:
        raise FedmlError(
            f"--days must be between 1 and {MAX_DAYS} (a hundred years), not {days}: a "
            "certificate's end date must fit X.509's calendar (year 9999 at the latest)."
        )
    targets = [directory / n for n in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)]
    _refuse_overwrite(targets, force, "fedml certs init")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, server_key = _ec_key(), _ec_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedml private CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=max(days, 3650)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    directory.mkdir(parents=True, exist_ok=True)
    _write_key(directory / CA_KEY, _pem_key(ca_key))
    _write_public(directory / CA_CERT, _pem_cert(ca_cert))
    _write_key(directory / SERVER_KEY, _pem_key(server_key))
    _write_public(directory / SERVER_CERT, _pem_cert(server_cert))
    return targets


def add_node(directory: Path, name: str, force: bool = False) -> list[Path]:
    """Create site `name`'s authentication key pair: `nodes/NAME.pub` for the server,
    `sites/NAME/` (the CA certificate and the private key) for the site."""

    if not NODE_NAME.fullmatch(name):
        raise FedmlError(
            f"Site name {name!r} is not usable: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit."
        )
    if not (directory / CA_CERT).is_file():
        raise FedmlError(
            f"{directory} has no {CA_CERT}. Create the PKI first: fedml certs init {directory}"
        )
    public_path = directory / NODES / f"{name}.pub"
    site = directory / SITES / name
    targets = [public_path, site / CA_CERT, site / NODE_KEY]
    _refuse_overwrite(targets, force, "fedml certs add-node")
    key = _ec_key()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public_path.parent.mkdir(parents=True, exist_ok=True)
    site.mkdir(parents=True, exist_ok=True)
    _write_public(public_path, public + f" fedml-site-{name}\n".encode())
    _write_public(site / CA_CERT, (directory / CA_CERT).read_bytes())
    _write_key(site / NODE_KEY, private)
    return targets


def server_files(directory: Path) -> ServerFiles:
    """The SuperLink's files in `directory`, checked: present, parseable, the
    certificate signed by the CA and matching its key, not expired."""
    files = ServerFiles(
        directory / CA_CERT,
        directory / SERVER_CERT,
        directory / SERVER_KEY,
        sorted((directory / NODES).glob("*.pub")),
    )
    _require([files.ca_cert, files.server_cert, files.server_key], directory, "server")
    ca = _load_cert(files.ca_cert)
    cert = _load_cert(files.server_cert)
    _check_validity(cert, files.server_cert)
    _check_signed_by(cert, ca, files.server_cert, files.ca_cert)
    key = _load_private_pem(files.server_key)
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise FedmlError(
            f"{files.server_key} does not belong to {files.server_cert}. Recreate both with "
            f"fedml certs init {directory} --force."
        )
    for path in files.node_keys:
        load_node_public_key(path)
    return files


def site_files(directory: Path) -> SiteFiles:
    """A site's files in `directory` (a `sites/NAME` folder), checked."""
    files = SiteFiles(directory / CA_CERT, directory / NODE_KEY)
    _require([files.ca_cert, files.node_key], directory, "site")
    _check_validity(_load_cert(files.ca_cert), files.ca_cert)
    load_node_private_key(files.node_key)
    return files


def load_node_public_key(path: Path):  # -> ec.EllipticCurvePublicKey
    """A site's OpenSSH EC public key, or a clear error."""

    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, OSError) as exc:
        raise FedmlError(f"{path} is not an OpenSSH public key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FedmlError(f"{path} is not an EC key; create it with fedml certs add-node.")
    return key


def load_node_private_key(path: Path):  # -> ec.EllipticCurvePrivateKey
    """A site's OpenSSH EC private key, or a clear error."""

    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, OSError, TypeError) as exc:
        raise FedmlError(
            f"{path} is not an unencrypted OpenSSH private key: {exc}. Use the node.key "
            "that fedml certs add-node wrote for this site."
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedmlError(f"{path} is not an EC key; create it with fedml certs add-node.")
    return key


# -- helpers ----------------------------------------------------------------------------


def _ec_key():  # -> ec.EllipticCurvePrivateKey

    return ec.generate_private_key(ec.SECP384R1())


def _ca_key_usage():  # -> x509.KeyUsage
    """A CA signs certificates (and revocation lists), nothing else."""

    flags = dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement"),
        False,
    )
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
        **flags,
    )


def _subject_alt_name(host: str):  # -> x509.GeneralName

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", host):
        raise FedmlError(
            f"--host {host!r} is neither an IP address nor a DNS name. Pass each name or "
            "address the sites use to reach the SuperLink, e.g. --host superlink.example.org."
        )
    return x509.DNSName(host)


def _pem_key(key) -> bytes:

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert) -> bytes:

    return cert.public_bytes(serialization.Encoding.PEM)


def _refuse_overwrite(paths: list[Path], force: bool, command: str) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FedmlError(
            f"{', '.join(existing)} already exist(s); nothing was written. Re-run `{command}` "
            "with --force to replace them (sites holding the old files must get new ones)."
        )


def _write_key(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only, from its first byte on."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)  # in case the umask was stricter than needed: exactly 0600


def _write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o644)


def _require(paths: list[Path], directory: Path, role: str) -> None:
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        fix = (
            f"Create them with `fedml certs init {directory}`, or pass the folder it wrote."
            if role == "server"
            else "Pass the folder that `fedml certs add-node NAME` wrote (PKI/sites/NAME)."
        )
        raise FedmlError(f"{directory} lacks {', '.join(missing)}. {fix}")


def _load_cert(path: Path):  # -> x509.Certificate

    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise FedmlError(f"{path} is not a PEM certificate: {exc}") from exc


def _load_private_pem(path: Path):

    try:
        return serialization.load_pem_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as exc:
        raise FedmlError(f"{path} is not an unencrypted PEM private key: {exc}") from exc


def _check_validity(cert, path: Path) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise FedmlError(
            f"{path} is valid from {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}, not now. Renew it with fedml certs init "
            "--force (and give sites the new ca.crt)."
        )


def _check_signed_by(cert, ca, cert_path: Path, ca_path: Path) -> None:

    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise FedmlError(
            f"{cert_path} was not issued by the CA in {ca_path}. Recreate it with fedml "
            "certs init --force."
        ) from exc
