"""Fixed-point encoding into Z_(2^bits): headroom, and the stated decoding error bound."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echelon.secagg.fixedpoint import FixedPoint


def _ring_sum(codec: FixedPoint, encodings: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(encodings[0])
    for e in encodings:
        total += e  # wraps modulo 2^bits
    return total


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 40),
    dim=st.integers(1, 64),
    clip=st.sampled_from([0.01, 1.0, 3.5, 1000.0]),
    log_scale=st.integers(0, 30),
    stochastic=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_decoded_sum_is_within_the_stated_bound(n, dim, clip, log_scale, stochastic, seed):
    codec = FixedPoint.for_sum(clip, 2.0**log_scale, n)
    rng = np.random.default_rng(seed)
    values = rng.uniform(-clip, clip, (n, dim))
    values[0, 0] = clip  # the range's edges are in range
    values[-1, -1] = -clip
    encodings = [codec.encode(v, np.random.default_rng(seed + 1) if stochastic else None) for v in values]
    decoded = codec.decode(_ring_sum(codec, encodings))
    error = np.abs(decoded - values.sum(axis=0)).max()
    # The float64 reference sum itself carries rounding of n * clip * 2^-52 at most.
    assert error <= codec.error_bound(n, stochastic) + n * clip * 2.0**-52


def test_headroom_picks_32_then_64_bits_then_refuses():
    assert FixedPoint.for_sum(1.0, 2.0**20, 64).bits == 32
    assert FixedPoint.for_sum(1.0, 2.0**20, 2047).bits == 32  # 2047 * 2^20 < 2^31
    assert FixedPoint.for_sum(1.0, 2.0**20, 2048).bits == 64  # 2^31 > 2^31 - 1
    assert FixedPoint.for_sum(1.0, 2.0**40, 2).bits == 64
    with pytest.raises(ValueError):
        FixedPoint.for_sum(1.0, 2.0**20, 4096, bits=32)
    with pytest.raises(ValueError):
        FixedPoint.for_sum(1.0, 2.0**52, 4096)
    with pytest.raises(ValueError):
        FixedPoint(1.0, 2.0**53, 64)
    with pytest.raises(ValueError):
        FixedPoint(1.0, 1.0, 16)


def test_extreme_sums_decode_exactly_at_the_headroom_limit():
    n = 2047
    codec = FixedPoint.for_sum(1.0, 2.0**20, n)
    for sign in (1.0, -1.0):
        encodings = [codec.encode(np.full(3, sign))] * n
        assert np.array_equal(codec.decode(_ring_sum(codec, encodings)), np.full(3, sign * n))


def test_values_beyond_the_clip_nan_and_inf_are_counted_and_refused_never_clipped():
    codec = FixedPoint(2.0, 2.0**10, 32)
    bad = np.array([5.0, -7.0, np.inf, -np.inf, np.nan, 0.5, 2.0, -2.0])
    assert codec.out_of_range(bad) == (1, 2, 2)
    with pytest.raises(ValueError, match="1 NaN, 2 infinite and 2 values beyond"):
        codec.encode(bad)
    edges = np.array([0.5, 2.0, -2.0])  # the range's edges are in range
    assert codec.out_of_range(edges).total == 0
    assert codec.decode(codec.encode(edges)).tolist() == [0.5, 2.0, -2.0]


def test_stochastic_rounding_is_unbiased():
    codec = FixedPoint(1.0, 1.0, 32)  # scale 1: 0.3 rounds to 0 or 1
    x = np.full(200_000, 0.3)
    decoded = codec.decode(codec.encode(x, np.random.default_rng(0)))
    assert set(np.unique(decoded)) == {0.0, 1.0}
    assert abs(decoded.mean() - 0.3) < 0.005  # ~5 standard errors
    assert np.array_equal(codec.decode(codec.encode(x)), np.zeros_like(x))  # nearest is biased here


def test_encoding_uses_the_ring_dtype():
    assert FixedPoint(1.0, 2.0, 32).encode(np.array([-1.0])).dtype == np.dtype("<u4")
    assert FixedPoint(1.0, 2.0, 64).encode(np.array([-1.0]))[0] == 2**64 - 2
