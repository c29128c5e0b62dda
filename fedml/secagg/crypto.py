"""The cryptography of secure aggregation, from `cryptography` and Flower.

- Key agreement: X25519; the shared secret goes through HKDF-SHA256 with a label saying
  what the key is for (a share-encryption key and a mask seed never coincide).
- Share ciphertexts: ChaCha20-Poly1305 (an AEAD) with the sender, the receiver and the
  round as associated data, so a ciphertext moved to another pair or round, or changed
  on the way, fails to open (`ShareTampered`).
- Masks: the ChaCha20 keystream of a 32-byte seed, read as uint64 values (a CSPRNG; a
  32-bit NumPy seed, as Flower's `pseudo_rand_gen` uses, could be searched).
- Shamir sharing: Flower's `flwr.common.secure_aggregation.crypto.shamir` (pinned by
  tests/test_secagg.py).
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

KEY_BYTES = 32
NONCE_BYTES = 12  # ChaCha20-Poly1305's nonce
_RAW = serialization.Encoding.Raw


class ShareTampered(ValueError):
    """A share ciphertext that does not open: changed, replayed or not for us."""


def private_key(secret: bytes | None = None) -> bytes:
    """A fresh X25519 private key (OS entropy), or the one `secret` (32 bytes) makes."""
    key = (
        X25519PrivateKey.generate()
        if secret is None
        else X25519PrivateKey.from_private_bytes(secret)
    )
    return key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def public_key(private: bytes) -> bytes:
    """The X25519 public key of `private` (32 bytes)."""
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(_RAW, serialization.PublicFormat.Raw)
    )


def usable_public_key(value: object) -> bool:
    """Whether `value` is an X25519 public key that agreement works with: 32 bytes, and
    not a low-order point (for which the exchange refuses to produce a secret)."""
    if not isinstance(value, bytes) or len(value) != KEY_BYTES:
        return False
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(value))
    except ValueError:
        return False
    return True


def agree(private: bytes, peer_public: bytes, purpose: bytes) -> bytes:
    """The 32-byte key two parties share (X25519, then HKDF-SHA256 labelled `purpose`).
    Raises ValueError for a public key that is not a valid X25519 point."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(peer_public)
    )
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=purpose).derive(shared)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """Encrypt and authenticate `plaintext`, bound to `associated` (nonce first)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def unseal(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """The plaintext of `seal`; `ShareTampered` when it was changed or is not for this
    key and `associated` data."""
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except (InvalidTag, ValueError) as exc:
        raise ShareTampered("the share ciphertext does not open") from exc


def mask(seed: bytes, size: int) -> np.ndarray:
    """`size` uniformly random uint64 values: the ChaCha20 keystream of `seed`."""
    cipher = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    stream = cipher.update(b"\0" * (8 * size))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """`count` Shamir shares of `secret`; any `threshold` of them recover it."""
    return create_shares(secret, threshold, count)


def join_shares(shares: list[bytes]) -> bytes:
    """The secret of at least `threshold` of its Shamir shares."""
    return combine_shares(shares)
