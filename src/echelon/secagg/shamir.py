"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

No kept Python library fits (the maintained ones share over GF(256) with mnemonic formats, or
only 16-byte secrets), so this is the textbook scheme: a random polynomial f of degree t - 1
with f(0) = secret; the share of holder x (1 <= x < p) is f(x). Any t shares give f(0) by
Lagrange interpolation; t - 1 shares are independent of the secret. A share value is written
as SHARE_BYTES little-endian bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

PRIME = 2**521 - 1  # a Mersenne prime; 32-byte secrets (< 2^256) are field elements
SHARE_BYTES = 66
SECRET_BYTES = 32


def _random_element(entropy: Callable[[int], bytes]) -> int:
    """A uniform element of GF(PRIME), by rejection sampling 521-bit integers."""
    while True:
        value = int.from_bytes(entropy(SHARE_BYTES), "little") & ((1 << 521) - 1)
        if value < PRIME:
            return value


def split(
    secret: bytes, threshold: int, holders: Iterable[int], entropy: Callable[[int], bytes]
) -> dict[int, int]:
    """Shares of the 32-byte `secret` for each holder x (distinct, 1 <= x < PRIME); t = `threshold`.

    `entropy(n)` returns n uniformly random bytes (os.urandom, or a seeded source in tests).
    """
    xs = list(holders)
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} B, not {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} is not within 1..{len(xs)} holders")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("holders must be distinct nonzero field elements")
    coefficients = [int.from_bytes(secret, "little")] + [
        _random_element(entropy) for _ in range(threshold - 1)
    ]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares[x] = y
    coefficients.clear()
    return shares


def combine(shares: Mapping[int, int]) -> bytearray:
    """The secret f(0) of the polynomial through all `shares` (x -> y), as 32 bytes.

    Give exactly t shares (more is fine only when they are consistent). Raises ValueError when a
    share is out of range or the interpolated value is not a 32-byte secret (inconsistent shares).
    The result is a bytearray so the caller can overwrite it once used.
    """
    if not shares:
        raise ValueError("no shares")
    if any(not 0 < x < PRIME or not 0 <= y < PRIME for x, y in shares.items()):
        raise ValueError("share out of the field")
    secret = 0
    for j, yj in shares.items():
        num, den = 1, 1
        for m in shares:
            if m != j:
                num = num * m % PRIME
                den = den * (m - j) % PRIME
        secret = (secret + yj * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ValueError("shares are inconsistent: the interpolated secret is out of range")
    return bytearray(secret.to_bytes(SECRET_BYTES, "little"))


def to_bytes(y: int) -> bytes:
    """A share value as SHARE_BYTES little-endian bytes."""
    return y.to_bytes(SHARE_BYTES, "little")


def from_bytes(data: bytes) -> int:
    """The share value in `data`; raises ValueError unless it is SHARE_BYTES bytes below PRIME."""
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} B, not {len(data)}")
    y = int.from_bytes(data, "little")
    if y >= PRIME:
        raise ValueError("share value is not a field element")
    return y
