"""The fixed-point encoding every integer-summing backend shares, and the checks on an institution's update.

A value x is clipped to ``[-c, c]``, scaled by ``2^f`` and rounded half to even: ``round(clip(x) * 2^f)``.
The masking backend stores it in the ring Z_{2^k} (``masking.quantize``), CrypTen secret-shares it as an int64
(``crypten_backend.fixed_point``); both sum the same integers, so they agree bit for bit on the decoded sum.
"""

from __future__ import annotations

import numpy as np

from fedse_secure.secagg.base import InvalidUpdateError


def max_quantised(clip_range: float, fractional_bits: int) -> int:
    """The largest encoded magnitude: ``round(c * 2^f)``."""
    return int(round(clip_range * 2.0**fractional_bits))


def working_float(x: np.ndarray) -> np.ndarray:
    """float32 stays float32 (x * 2^f is exact there: a power-of-two scale); anything else becomes float64."""
    if x.dtype == np.float32 or x.dtype == np.float64:
        return x
    return x.astype(np.float64)


def check_update(who: str, vector: np.ndarray, expected_len: int | None = None) -> np.ndarray:
    """The update as one flat float vector of the expected length, or :class:`InvalidUpdateError`."""
    v = np.asarray(vector)
    if v.ndim != 1:
        raise InvalidUpdateError(f"{who}: the update must be one flat vector, got shape {v.shape}; flatten it")
    if not (np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.integer)):
        raise InvalidUpdateError(f"{who}: the update has dtype {v.dtype}; send a float vector")
    if expected_len is not None and v.size != expected_len:
        raise InvalidUpdateError(
            f"{who}: the update has {v.size} values but the round aggregates {expected_len}; all institutions must "
            "send adapters of the same shape"
        )
    return working_float(v)


def check_finite(x: np.ndarray, who: str) -> None:
    # A float64 sum of float32 values cannot overflow, so it is finite iff every element is: one cheap pass.
    s = float(np.sum(x, dtype=np.float64))
    if np.isfinite(s):
        return
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise InvalidUpdateError(
            f"{who}'s update contains {bad} NaN/Inf value(s); fix the training step (e.g. lower the learning "
            "rate or enable gradient clipping) before aggregating"
        )


def count_out_of_range(x: np.ndarray, clip_range: float) -> int:
    if x.size == 0:
        return 0
    lo, hi = float(np.min(x)), float(np.max(x))
    if lo >= -clip_range and hi <= clip_range:
        return 0
    return int(np.count_nonzero(x > clip_range) + np.count_nonzero(x < -clip_range))


def refuse_out_of_range(who: str, x: np.ndarray, clip_range: float, count: int) -> None:
    # Counts only, never a value of the update: this text reaches the coordinator's log as the refusal reason.
    raise InvalidUpdateError(
        f"{who}'s update has {count} value(s) outside +-{clip_range:g} and "
        "federation.secure_aggregation.on_out_of_range is refuse; raise federation.secure_aggregation.clip_range "
        "or set on_out_of_range: clip"
    )


def encode(x: np.ndarray, clip_range: float, fractional_bits: int, dtype: np.dtype | type = np.int64) -> np.ndarray:
    """Clip, scale by 2^f and round half to even, as signed integers of ``dtype``."""
    x = working_float(np.asarray(x).reshape(-1))
    c = x.dtype.type(clip_range)
    scaled = np.clip(x, -c, c)
    np.multiply(scaled, x.dtype.type(2.0**fractional_bits), out=scaled)
    np.rint(scaled, out=scaled)
    return scaled.astype(dtype)
