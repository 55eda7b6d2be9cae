"""X25519, HKDF domain separation, the chunked ChaCha20 mask PRG and the share AEAD."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from echelon.secagg import primitives as crypto

KEY = bytes(range(32))


def test_mask_prg_is_the_chacha20_keystream_under_the_full_key():
    acc = np.zeros(1000, dtype=np.uint32)
    crypto.apply_masks(acc, [(KEY, 1)])
    encryptor = Cipher(algorithms.ChaCha20(KEY, bytes(16)), mode=None).encryptor()
    assert acc.tobytes() == encryptor.update(bytes(4000))
    other = np.zeros(1000, dtype=np.uint32)
    crypto.apply_masks(other, [(KEY[:-1] + b"\x00", 1)])  # one bit of the key changes every word
    assert np.mean(acc == other) < 0.01


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("chunk", [1, 7, 100, 4096])
def test_chunked_masks_equal_one_shot_masks(dtype, chunk):
    keys = [(bytes([k]) * 32, sign) for k, sign in ((1, 1), (2, -1), (3, 1))]
    one_shot = np.arange(1001, dtype=dtype)
    crypto.apply_masks(one_shot, keys, chunk=1 << 20)
    chunked = np.arange(1001, dtype=dtype)
    crypto.apply_masks(chunked, keys, chunk=chunk)
    assert np.array_equal(one_shot, chunked)


def test_opposite_masks_cancel_modulo_the_ring():
    acc = np.arange(513, dtype=np.uint64)
    crypto.apply_masks(acc, [(KEY, 1), (KEY, -1)], chunk=64)
    assert np.array_equal(acc, np.arange(513, dtype=np.uint64))


def test_masks_refuse_bad_targets_and_keys():
    with pytest.raises(ValueError):
        crypto.apply_masks(np.zeros(4, dtype=np.float64), [(KEY, 1)])
    with pytest.raises(ValueError):
        crypto.apply_masks(np.zeros(4, dtype=np.uint32), [(KEY[:16], 1)])


def test_key_agreement_is_symmetric_and_refuses_low_order_points():
    a, b = crypto.private_key(bytes([1]) * 32), crypto.private_key(bytes([2]) * 32)
    assert crypto.agree(a, crypto.public_bytes(b)) == crypto.agree(b, crypto.public_bytes(a))
    for bad in (bytes(32), (1).to_bytes(32, "little"), bytes(31)):
        with pytest.raises(ValueError):
            crypto.agree(a, bad)


def test_derived_keys_are_separated_by_round_purpose_and_pair():
    keys = {
        crypto.derive_key(KEY, r, purpose, i, j)
        for r in (1, 2)
        for purpose in crypto.Purpose
        for i, j in ((1, 2), (2, 1), (1, 3))
    }
    assert len(keys) == 2 * len(crypto.Purpose) * 3
    assert crypto.pair_key(KEY, 5, 3, 9) == crypto.pair_key(KEY, 5, 9, 3)
    assert crypto.seed_commitment(KEY, 1) != crypto.seed_commitment(KEY, 2)


def test_sealed_shares_detect_tampering_and_misbinding():
    aad = crypto.share_aad(7, 1, 2)
    sealed = crypto.seal(KEY, b"share pair", aad, bytes(12))
    assert crypto.unseal(KEY, sealed, aad) == b"share pair"
    flipped = bytearray(sealed)
    flipped[15] ^= 1
    for key, data, bound in (
        (KEY, bytes(flipped), aad),
        (KEY, sealed, crypto.share_aad(7, 2, 1)),  # receiver and sender swapped
        (KEY, sealed, crypto.share_aad(8, 1, 2)),  # replayed into another round
        (bytes(32), sealed, aad),
        (KEY, sealed[:20], aad),
    ):
        with pytest.raises(ValueError):
            crypto.unseal(key, data, bound)
    with pytest.raises(ValueError):
        crypto.seal(KEY, b"x", aad, bytes(8))
