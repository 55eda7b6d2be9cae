"""Ed25519 keys of the audit log's parties.

A party's private key is a PKCS#8 PEM file, mode 0600, in a key directory of its own (0700) that
never enters the run directory; its public key is a SubjectPublicKeyInfo PEM in the run's audit
directory, where the auditor finds it (or in a directory of keys the auditor trusts).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from echelon.audit.layout import check_party, private_key_path
from echelon.errors import UserError


def fingerprint(key: Ed25519PublicKey) -> str:
    """Hex SHA-256 of the 32 raw public key bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` holding `data` (mode `mode`) whole or not at all; never replaces a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails when `path` exists: no silent overwrite
    finally:
        os.unlink(tmp)


def generate_signing_key(key_dir: Path, party: str) -> Ed25519PrivateKey:
    """A fresh key for `party`, saved as `<key_dir>/<party>.key.pem` (0600; the directory 0700).

    UserError when that file already exists: load it with `load_signing_key` instead.
    """
    check_party(party)
    key_dir = Path(key_dir)
    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = private_key_path(key_dir, party)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        write_new(path, pem, 0o600)
    except FileExistsError:
        raise UserError(f"{path} already exists; load it instead of generating a new key") from None
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in `path`; UserError when missing, unreadable, not Ed25519, or
    readable by anyone but its owner."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read private key {path}: {e.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f"private key {path} is accessible by others (mode {mode & 0o777:o}); chmod 600 it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:  # UnsupportedAlgorithm: an unknown key type
        raise UserError(f"{path} is not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def write_public_key(path: Path, key: Ed25519PublicKey) -> None:
    """Publish `key` at `path`; a no-op when that very key is there, UserError when another is."""
    path = Path(path)
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if path.exists():
        if fingerprint(load_public_key(path)) != fingerprint(key):
            raise UserError(f"{path} holds a different public key; refusing to replace it")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_new(path, pem, 0o644)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in `path`; UserError when missing, unreadable or not Ed25519."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read public key {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:  # UnsupportedAlgorithm: an unknown key type
        raise UserError(f"{path} is not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UserError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key
