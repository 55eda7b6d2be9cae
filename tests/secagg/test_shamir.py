"""Shamir t-of-n over GF(2^521 - 1): any t shares give the secret, fewer do not."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echelon.secagg import shamir


def _entropy(seed: int):
    return random.Random(seed).randbytes


def test_field_modulus_is_prime():
    p = shamir.PRIME
    d, s = p - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):  # Miller-Rabin witnesses
        x = pow(a, d, p)
        assert x in (1, p - 1) or any(pow(x, 2**r, p) == p - 1 for r in range(1, s))


@settings(max_examples=60, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    n=st.integers(1, 12),
    data=st.data(),
    seed=st.integers(0, 2**32),
)
def test_any_t_shares_reconstruct_and_t_minus_1_do_not(secret, n, data, seed):
    t = data.draw(st.integers(1, n))
    holders = data.draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n, unique=True))
    shares = shamir.split(secret, t, holders, _entropy(seed))
    subset = data.draw(st.lists(st.sampled_from(holders), min_size=t, max_size=n, unique=True))
    assert bytes(shamir.combine({x: shares[x] for x in subset})) == secret
    if t >= 2:
        fewer = subset[: t - 1]
        with contextlib.suppress(ValueError):  # raised when f(0) is not even a 32-byte value
            assert bytes(shamir.combine({x: shares[x] for x in fewer})) != secret


def test_shares_depend_on_the_randomness_not_only_the_secret():
    a = shamir.split(bytes(32), 3, [1, 2, 3], _entropy(1))
    b = shamir.split(bytes(32), 3, [1, 2, 3], _entropy(2))
    assert a != b
    assert bytes(shamir.combine(a)) == bytes(shamir.combine(b)) == bytes(32)


def test_inconsistent_shares_are_refused_or_wrong():
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, [1, 2, 3, 4], _entropy(0))
    shares[2] = (shares[2] + 1) % shamir.PRIME
    assert bytes(shamir.combine({x: shares[x] for x in (1, 2, 3)})) != secret
    shares[2] = (shares[2] + 2**300) % shamir.PRIME
    with pytest.raises(ValueError):
        shamir.combine({x: shares[x] for x in (1, 2, 3)})  # f(0) is no longer a 256-bit value


@pytest.mark.parametrize(
    ("secret", "t", "holders"),
    [
        (bytes(31), 1, [1]),
        (bytes(32), 0, [1]),
        (bytes(32), 3, [1, 2]),
        (bytes(32), 1, [0]),
        (bytes(32), 2, [4, 4]),
    ],
)
def test_split_refuses_bad_arguments(secret, t, holders):
    with pytest.raises(ValueError):
        shamir.split(secret, t, holders, _entropy(0))


def test_combine_refuses_out_of_field_shares():
    with pytest.raises(ValueError):
        shamir.combine({})
    with pytest.raises(ValueError):
        shamir.combine({1: shamir.PRIME})
    with pytest.raises(ValueError):
        shamir.combine({0: 5})


def test_share_bytes_round_trip_and_validation():
    y = shamir.PRIME - 1
    assert shamir.from_bytes(shamir.to_bytes(y)) == y
    with pytest.raises(ValueError):
        shamir.from_bytes(bytes(65))
    with pytest.raises(ValueError):
        shamir.from_bytes(shamir.PRIME.to_bytes(shamir.SHARE_BYTES, "little"))
