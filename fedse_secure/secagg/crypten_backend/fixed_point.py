"""Fixed-point encoding for the CrypTen backend, done by us rather than by CrypTen.

CrypTen's own encoder (16 fractional bits by default) *truncates* on encoding (``(x * 2**16).long()``) and
its ``FixedPointEncoder.decode`` floor-divides negative ring values by ``scale - 1``, so some negative
values just above an integer come back exactly 1.0 too low (``-29.99999`` -> ``-30.99998``). We therefore
hand CrypTen values that are already integers and share them with ``precision=0`` (its encoder then
multiplies by 1 and never divides), and we decode the revealed int64 ring value ourselves.

Encoding is the masking backend's, from the one shared module (``fedse_secure.secagg.encoding``): clip to
``[-c, c]``, scale by ``2^f``, round half to even. Both backends therefore sum the *same integers* and
agree bit for bit on the decoded total.

Precision: CrypTen's ring is Z_{2^64} (int64 shares, wrap-around addition). The revealed value is the
exact integer sum as long as ``n * round(c * 2^f) <= 2^63 - 1``; with the defaults (c = 8, f = 24) that
holds for up to 2^35 parties, and even f = 40 leaves room for 2^19 parties. So we are not limited to
CrypTen's 16 bits: ``federation.secure_aggregation.fractional_bits`` (24 by default) is used as is. The decoded sum is
within ``n * 2^-(f+1)`` of the sum of the clipped inputs (one rounding per input), plus float64 rounding
of the result (relative 2^-53).
"""

from __future__ import annotations

import numpy as np

from fedse_secure.secagg.base import SecureAggregationError
from fedse_secure.secagg.encoding import encode, max_quantised

__all__ = ["INT64_MAX", "check_headroom", "decode", "encode", "error_bound", "max_quantised"]

INT64_MAX = 2**63 - 1


def check_headroom(n_parties: int, clip_range: float, fractional_bits: int) -> None:
    """Refuse a set-up whose sum could wrap around the int64 ring (the revealed value would be wrong)."""
    bound = n_parties * max_quantised(clip_range, fractional_bits)
    if bound > INT64_MAX:
        raise SecureAggregationError(
            f"{n_parties} institutions x clip_range {clip_range} x 2^{fractional_bits} overflows CrypTen's "
            "64-bit ring; lower federation.secure_aggregation.fractional_bits or clip_range"
        )


def error_bound(n_parties: int, fractional_bits: int) -> float:
    """Largest distance between the decoded sum and the exact sum of the clipped inputs, before the final
    float64 rounding: each input is rounded to the nearest multiple of 2^-f once."""
    return n_parties * 2.0 ** -(fractional_bits + 1)


def decode(ring_sum: np.ndarray, fractional_bits: int) -> np.ndarray:
    """The revealed int64 ring sum as float64.

    Exact apart from one correctly rounded step: ``astype(float64)`` rounds the integer to nearest (exact
    below 2^53, which the headroom rule keeps us under for any realistic n), and dividing by a power of two
    is exact. Unlike CrypTen's decoder there is no floor division, so negative values are not shifted.
    """
    ring_sum = np.asarray(ring_sum)
    if ring_sum.dtype != np.int64:
        raise TypeError(f"expected the int64 ring sum, got {ring_sum.dtype}")
    return ring_sum.astype(np.float64) / 2.0**fractional_bits
