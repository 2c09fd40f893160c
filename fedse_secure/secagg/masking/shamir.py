"""Shamir secret sharing over the prime field GF(2^521 - 1).

The Mersenne prime 2^521 - 1 holds a 32-byte secret (self-mask seed, X25519 private key) in one field
element, so a share is one point: 2 bytes of x-coordinate + 66 bytes of y. Coefficients come from the
caller's :class:`~fedse_secure.secagg.masking.prg.RandomSource` (the OS CSPRNG in production).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedse_secure.secagg.masking.errors import SecureAggregationError
from fedse_secure.secagg.masking.prg import RandomSource

PRIME = 2**521 - 1
_Y_BYTES = 66
SHARE_BYTES = 2 + _Y_BYTES
SECRET_BYTES = 32


def split(secret: bytes, threshold: int, xs: Sequence[int], rng: RandomSource) -> dict[int, bytes]:
    """Shares of ``secret`` at the points ``xs`` (distinct, 1..65535); any ``threshold`` of them recover it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"Shamir secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be between 1 and the number of shares ({len(xs)})")
    if len(set(xs)) != len(xs) or any(not 0 < x < 65536 for x in xs):
        raise ValueError("share x-coordinates must be distinct and in 1..65535")
    coeffs = [int.from_bytes(secret, "big")] + [rng.below(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for a in reversed(coeffs):
            y = (y * x + a) % PRIME
        out[x] = x.to_bytes(2, "big") + y.to_bytes(_Y_BYTES, "big")
    return out


def share_x(share: bytes) -> int:
    return int.from_bytes(share[:2], "big")


def combine(shares: Sequence[bytes], threshold: int) -> bytes:
    """Lagrange interpolation at 0 of the first ``threshold`` distinct shares."""
    points: dict[int, int] = {}
    for s in shares:
        if len(s) != SHARE_BYTES:
            raise SecureAggregationError(f"a Shamir share has {len(s)} bytes, expected {SHARE_BYTES}")
        x, y = share_x(s), int.from_bytes(s[2:], "big")
        if y >= PRIME or x == 0:
            raise SecureAggregationError("a Shamir share is outside the field; it was corrupted in transit")
        points.setdefault(x, y)
        if len(points) == threshold:
            break
    if len(points) < threshold:
        raise SecureAggregationError(f"need {threshold} distinct shares to reconstruct, got {len(points)}")
    xs = list(points)
    # Lagrange at 0: y_i * prod_j x_j / (x_j - x_i). The x-coordinates are small integers, so the products are
    # exact (a few hundred bits for t ~ 100) and cost little; only the accumulation works mod p, as one running
    # fraction acc/den with a single inversion at the end.
    everything = 1
    for x in xs:
        everything *= x
    acc, den = 0, 1
    for xi in xs:
        d_i = 1
        for xj in xs:
            if xj != xi:
                d_i *= xj - xi
        acc = (acc * d_i + points[xi] * (everything // xi) * den) % PRIME
        den = den * d_i % PRIME
    secret = acc * pow(den, -1, PRIME) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise SecureAggregationError("reconstructed secret is out of range; at least one share is corrupted")
    return secret.to_bytes(SECRET_BYTES, "big")
