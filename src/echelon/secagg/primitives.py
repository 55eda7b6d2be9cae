"""Cryptographic primitives of SecAgg+, all from `cryptography`.

- X25519 key agreement (`agree`), refusing low-order public keys.
- HKDF-SHA256 (`derive_key`) with domain separation: every 256-bit key is bound to the round,
  the purpose and the participant indices it serves, so no key is ever used for two things.
- The mask PRG: the ChaCha20 keystream under the full 256-bit key (zero nonce: each key is used
  for exactly one stream), read as little-endian words of Z_(2^bits). `apply_masks` generates
  it chunk by chunk, so a mask of any length is regenerated in O(chunk) memory, and the result
  does not depend on the chunk size.
- ChaCha20-Poly1305 (`seal`/`unseal`) for the shares in transit, with associated data binding
  the round, the sender and the receiver (`share_aad`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from enum import Enum

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
DOMAIN = b"echelon/secagg/v1"
_STREAM_NONCE = bytes(16)  # ChaCha20's 4-byte block counter (0) and 12-byte nonce (0)
_ZEROS = bytes(1 << 20)


class Purpose(Enum):
    """What a derived key is for; part of the HKDF info, so keys of different purposes differ."""

    SHARE_TRANSPORT = b"share-transport"  # AEAD key for the shares sender -> receiver (ordered)
    PAIRWISE_MASK = b"pairwise-mask"  # PRG key of the mask between two neighbours (unordered)
    SELF_MASK = b"self-mask"  # PRG key of a participant's own mask


def private_key(secret: bytes) -> X25519PrivateKey:
    """The X25519 private key whose 32 raw bytes are `secret` (fresh entropy, or a reconstruction)."""
    return X25519PrivateKey.from_private_bytes(bytes(secret))


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32-byte raw public key of `key`."""
    return key.public_key().public_bytes_raw()


def agree(key: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The 32-byte X25519 shared secret with `peer_public`.

    Raises ValueError when `peer_public` is not 32 bytes or is a low-order point (all-zero secret).
    """
    return key.exchange(X25519PublicKey.from_public_bytes(peer_public))


def derive_key(secret: bytes, round_id: int, purpose: Purpose, i: int, j: int) -> bytes:
    """A 256-bit key for (`round_id`, `purpose`, i, j) from a 32-byte `secret`, by HKDF-SHA256."""
    info = purpose.value + b"\x00" + round_id.to_bytes(8, "little") + i.to_bytes(4, "little")
    info += j.to_bytes(4, "little")
    return HKDF(algorithm=SHA256(), length=KEY_BYTES, salt=DOMAIN, info=info).derive(bytes(secret))


def pair_key(secret: bytes, round_id: int, i: int, j: int) -> bytes:
    """The PRG key of the pairwise mask of neighbours i and j (the same for both orders)."""
    return derive_key(secret, round_id, Purpose.PAIRWISE_MASK, min(i, j), max(i, j))


def seed_commitment(seed: bytes, round_id: int) -> bytes:
    """SHA-256 commitment to a 32-byte self-mask seed of round `round_id` (the seed is uniform)."""
    return hashlib.sha256(
        DOMAIN + b"/seed-commitment" + round_id.to_bytes(8, "little") + bytes(seed)
    ).digest()


def share_aad(round_id: int, sender: int, receiver: int) -> bytes:
    """Associated data of the shares `sender` encrypts for `receiver` in `round_id`."""
    return (
        DOMAIN
        + round_id.to_bytes(8, "little")
        + sender.to_bytes(4, "little")
        + receiver.to_bytes(4, "little")
    )


def seal(key: bytes, plaintext: bytes, aad: bytes, nonce: bytes) -> bytes:
    """ChaCha20-Poly1305: nonce (12 B) || ciphertext || tag (16 B)."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce is {len(nonce)} B, not {NONCE_BYTES}")
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """The plaintext of `seal`'s output; raises ValueError when it was altered or `aad` differs."""
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise ValueError(f"sealed message of {len(sealed)} B is too short")
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except InvalidTag:
        raise ValueError("authentication failed (altered ciphertext or wrong associated data)") from None


class MaskStream:
    """The ChaCha20 keystream under one 256-bit key, read as consecutive little-endian words."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a mask key is {KEY_BYTES} B, not {len(key)}")
        self._encryptor = Cipher(algorithms.ChaCha20(bytes(key), _STREAM_NONCE), mode=None).encryptor()

    def fill(self, out: np.ndarray) -> None:
        """Overwrite the C-contiguous `out` with the next `out.nbytes` bytes of the stream."""
        buf = memoryview(out).cast("B")
        n = len(buf)
        self._encryptor.update_into(_ZEROS[:n] if n <= len(_ZEROS) else bytes(n), buf)


def apply_masks(acc: np.ndarray, masks: Sequence[tuple[bytes, int]], chunk: int = 1 << 16) -> None:
    """acc += sum of sign * PRG(key) over `masks`, in place, modulo 2^bits of acc's dtype.

    `acc` is a 1-D C-contiguous uint32 or uint64 array; each sign is +1 or -1. The masks are
    generated `chunk` elements at a time, all streams advancing together, so memory is
    O(chunk + len(masks)) beyond `acc`.
    """
    if acc.dtype not in (np.uint32, np.uint64) or acc.ndim != 1 or not acc.flags.c_contiguous:
        raise ValueError(f"masks apply to a contiguous 1-D uint32/uint64 array, not {acc.dtype}")
    streams = [(MaskStream(key), sign) for key, sign in masks]
    if not streams:
        return
    scratch = np.empty(min(chunk, acc.size), dtype=acc.dtype)
    for start in range(0, acc.size, chunk):
        part = acc[start : start + chunk]
        words = scratch[: part.size]
        for stream, sign in streams:
            stream.fill(words)
            if sign > 0:
                np.add(part, words, out=part)
            else:
                np.subtract(part, words, out=part)
