"""Fixed-point encoding of real vectors into the ring Z_(2^bits), so masked sums are exact.

A value x is clipped to [-clip, clip], multiplied by `scale` and rounded to an integer q with
|q| <= ceil(clip * scale), stored modulo 2^bits (two's complement). A sum of n encodings decodes
exactly (as the signed integer it is, divided by `scale`) while n * ceil(clip * scale) fits the
signed range, |sum| <= 2^(bits - 1) - 1: `FixedPoint.for_sum` checks this headroom and picks
bits = 32 when it suffices, else 64.

Decoding error bound, per coordinate, for n contributors whose values lie within [-clip, clip]:
- round to nearest: |decode(sum of encodings) - sum of values| <= n / (2 * scale);
- stochastic rounding (floor(x * scale + u), u ~ U[0, 1) from the caller's seeded generator):
  unbiased, and the error is < n / scale;
plus float64 rounding (of x * scale, and of a 64-bit sum beyond 2^53): at most n * clip * 2^-52.
`error_bound` returns this bound. Values beyond the clip range, NaN and infinities are never
clipped or zeroed: `out_of_range` counts them and `encode` refuses them (ValueError), so a
participant refuses to submit such an input (and says so) instead of submitting a different one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

MAX_SCALED = 2.0**52  # clip * scale bound: float64 still holds every integer up to it exactly


class OutOfRange(NamedTuple):
    """Counts of values an encoding refuses."""

    nan: int
    inf: int
    beyond_clip: int  # finite values with |x| > clip

    def __add__(self, other: tuple) -> OutOfRange:  # type: ignore[override]
        return OutOfRange(*(a + b for a, b in zip(self, other, strict=True)))

    @property
    def total(self) -> int:
        return self.nan + self.inf + self.beyond_clip


@dataclass(frozen=True)
class FixedPoint:
    """Encoding of values in [-clip, clip] as round(x * scale) in Z_(2^bits)."""

    clip: float
    scale: float
    bits: int

    def __post_init__(self) -> None:
        if self.bits not in (32, 64):
            raise ValueError(f"bits must be 32 or 64, not {self.bits}")
        if not (self.clip > 0 and self.scale > 0 and self.clip * self.scale <= MAX_SCALED):
            raise ValueError(
                f"need clip > 0, scale > 0 and clip * scale <= 2^52 (clip {self.clip}, scale {self.scale})"
            )

    @classmethod
    def for_sum(cls, clip: float, scale: float, contributors: int, bits: int | None = None) -> FixedPoint:
        """The encoding whose ring holds a sum of `contributors` encodings without overflow.

        `bits` None picks 32 when the headroom allows it, else 64; raises ValueError when the
        requested (or even the 64-bit) ring is too small for contributors * ceil(clip * scale).
        """
        if contributors < 1:
            raise ValueError(f"need at least one contributor, not {contributors}")
        need = contributors * math.ceil(clip * scale)
        for b in (32, 64) if bits is None else (bits,):
            if need <= 2 ** (b - 1) - 1:
                return cls(clip, scale, b)
        raise ValueError(
            f"{contributors} contributors x clip {clip} x scale {scale} overflow Z_(2^{bits or 64}): "
            "lower the scale or the clip range"
        )

    @property
    def dtype(self) -> np.dtype:
        """Unsigned little-endian dtype of the ring elements."""
        return np.dtype("<u4" if self.bits == 32 else "<u8")

    def out_of_range(self, values: np.ndarray) -> OutOfRange:
        """How many of `values` are NaN, infinite, or finite beyond [-clip, clip]."""
        x = np.asarray(values, dtype=np.float64)
        nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
        with np.errstate(invalid="ignore"):
            beyond = int((np.abs(x) > self.clip).sum()) - inf
        return OutOfRange(nan, inf, beyond)

    def encode(self, values: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Ring elements of `values` (float64 math): round to nearest, or stochastic with `rng`.

        ValueError when a value is NaN, infinite or beyond the clip (see `out_of_range`).
        """
        x = np.array(values, dtype=np.float64)
        refused = self.out_of_range(x)
        if refused.total:
            raise ValueError(
                f"{refused.nan} NaN, {refused.inf} infinite and {refused.beyond_clip} values beyond "
                f"+-{self.clip} cannot be encoded"
            )
        x *= self.scale
        if rng is None:
            np.rint(x, out=x)
        else:
            x += rng.random(x.shape)
            np.floor(x, out=x)
        return x.astype(np.int64).astype(self.dtype)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """float64 values of the ring elements `total` (a sum of encodings), read as signed."""
        signed = np.asarray(total, dtype=self.dtype).view(np.int32 if self.bits == 32 else np.int64)
        out = signed.astype(np.float64)
        out /= self.scale
        return out

    def error_bound(self, contributors: int, stochastic: bool = False) -> float:
        """Largest |decoded sum - true sum| per coordinate for `contributors` in-range values."""
        rounding = contributors / self.scale if stochastic else contributors / (2 * self.scale)
        return rounding + contributors * self.clip * 2.0**-52
