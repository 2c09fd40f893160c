"""Fixed-point quantisation into the ring Z_{2^k} and back.

A value x is clipped to ``[-c, c]`` and mapped to ``round(x * 2^f)`` (round half to even), stored in two's
complement in ``uint32`` or ``uint64`` so that numpy's wrap-around *is* arithmetic mod 2^k. The ring is the
smallest of 2^32 and 2^64 in which the sum of n clients cannot overflow:
``n * round(c * 2^f) <= 2^(k-1) - 1``, so the signed reading of the ring sum is the exact integer sum.

By default f is 24, lowered per round as far as needed for the ring to stay 32 bits (:func:`fractional_bits_for`):
the masked upload is then the size of the fp32 adapter. With clip 8 that is f = 24 up to 10 institutions, 22 at
40, 21 at 100 and 18 at 1000: a value's rounding error is at most 2^-(f+1) (2^-19 = 1.9e-6 at n = 1000, the same step as
Flower's 2^22 levels over [-8, 8]), a sum's at most n 2^-(f+1).

The masked vector carries one extra element after the update: the number of values the client clipped,
capped at ``round(c * 2^f)`` so that it obeys the same overflow rule. It is masked and summed like the rest, so
the server learns only the total clipped count, never a single client's (that count could otherwise leak how
far an update strays).
"""

from __future__ import annotations

import numpy as np

from fedse_secure.secagg.base import InvalidUpdateError, SecureAggregationError
from fedse_secure.secagg.encoding import check_finite, count_out_of_range, encode, max_quantised, working_float
from fedse_secure.secagg.masking.prg import KERNEL

RING_DTYPES = {32: np.dtype(np.uint32), 64: np.dtype(np.uint64)}
SIGNED_DTYPES = {32: np.dtype(np.int32), 64: np.dtype(np.int64)}


MAX_FRACTIONAL_BITS = 40


def fractional_bits_for(n_clients: int, clip_range: float) -> int:
    """The most fractional bits that keep the sum of ``n_clients`` clipped inputs in a 32-bit ring."""
    for f in range(MAX_FRACTIONAL_BITS, 0, -1):
        if n_clients * max_quantised(clip_range, f) <= 2**31 - 1:
            return f
    raise SecureAggregationError(
        f"{n_clients} clients x clip_range {clip_range} do not fit a 32-bit ring at any precision; lower "
        "federation.secure_aggregation.clip_range"
    )


def required_ring_bits(n_clients: int, clip_range: float, fractional_bits: int, vector_len: int = 0) -> int:
    """Smallest supported ring (32 or 64 bits) whose signed range holds the sum of ``n_clients`` inputs (and
    of their clipped-value counts, each capped at ``round(c * 2^f)``). ``vector_len`` is not needed any more
    and only kept for callers that pass it."""
    bound = n_clients * max_quantised(clip_range, fractional_bits)
    for bits in (32, 64):
        if bound <= 2 ** (bits - 1) - 1:
            return bits
    raise SecureAggregationError(
        f"{n_clients} clients x clip_range {clip_range} x 2^{fractional_bits} overflows a 64-bit ring; "
        "lower federation.secure_aggregation.fractional_bits or clip_range"
    )


def quantise_into(x: np.ndarray, out: np.ndarray, clip_range: float, fractional_bits: int, ring_bits: int) -> None:
    """Encode ``x`` (float) into ``out`` (ring dtype, same length): the shared encoding, two's complement."""
    out[...] = encode(x, clip_range, fractional_bits, SIGNED_DTYPES[ring_bits]).view(RING_DTYPES[ring_bits])


class ChunkQuantiser:
    """Checks and quantises an update chunk by chunk (the chunk is in cache, so the checks are nearly free).

    Used as the ``before_chunk`` hook of :class:`~fedse_secure.secagg.masking.prg.MaskApplier`, so the input is
    read from memory once. NaN/Inf raise :class:`InvalidUpdateError`; out-of-range values are counted and
    clipped, or raise when ``refuse`` is set. float32 into the 32-bit ring runs in the compiled kernel where
    there is one (``kernel``; the same integers as numpy's path, tested).
    """

    def __init__(self, x: np.ndarray, clip_range: float, fractional_bits: int, ring_bits: int, who: str,
                 refuse: bool = False, kernel=KERNEL) -> None:
        self.x = working_float(x)
        self.kernel = kernel if self.x.dtype == np.float32 and ring_bits == 32 else None
        if self.kernel is not None:
            self.x = np.ascontiguousarray(self.x)
        self.c = self.x.dtype.type(clip_range)
        self.scale = self.x.dtype.type(2.0**fractional_bits)
        self.signed = SIGNED_DTYPES[ring_bits]
        self.who, self.refuse = who, refuse
        self.buf = np.empty(0, dtype=self.x.dtype)
        self.values_clipped = 0
        self.count_cap = max_quantised(clip_range, fractional_bits)

    def __call__(self, start: int, stop: int, out: np.ndarray) -> np.ndarray | None:
        """Quantises ``x[start:stop]`` into ``out``; returns the next chunk's input (for the mask kernel to bring
        into cache while it works) where the kernel quantises, else None."""
        n = self.x.size
        if stop > n:  # the last chunk also holds the trailing clipped-count element
            if n > start:
                self(start, n, out[: n - start])
            # Capped like a value, so the summed counts cannot overflow the ring either.
            out[n - start :].view(self.signed)[...] = min(self.values_clipped, self.count_cap)
            return None
        xs = self.x[start:stop]
        if self.kernel is not None:
            clipped, nonfinite = self.kernel.quantise_f32_i32(xs, out, float(self.c), float(self.scale))
            if nonfinite:
                check_finite(xs, self.who)
            if clipped and self.refuse:
                self._refuse()
            self.values_clipped += clipped
            return self.x[stop : stop + (stop - start)]
        if self.buf.size < stop - start:
            self.buf = np.empty(stop - start, dtype=self.x.dtype)
        f = self.buf[: stop - start]
        c = self.c
        lo, hi = xs.min(), xs.max()
        if lo >= -c and hi <= c:  # False for NaN, so the slow path below also catches NaN/Inf
            np.multiply(xs, self.scale, out=f)
        else:
            check_finite(xs, self.who)
            k = count_out_of_range(xs, float(c))
            if k and self.refuse:
                self._refuse()
            self.values_clipped += k
            np.clip(xs, -c, c, out=f)
            np.multiply(f, self.scale, out=f)
        np.rint(f, out=f)
        out.view(self.signed)[...] = f
        return None

    def _refuse(self) -> None:
        # No value of the update in the text: it reaches the coordinator's log as the refusal reason.
        c = float(self.c)
        raise InvalidUpdateError(
            f"{self.who}: the update has value(s) outside [-{c}, {c}]; raise "
            "federation.secure_aggregation.clip_range or set its on_out_of_range: clip"
        )


def quantise(x: np.ndarray, clip_range: float, fractional_bits: int, ring_bits: int) -> np.ndarray:
    """The ring representation of one update (what the masked vector hides)."""
    x = working_float(np.asarray(x).reshape(-1))
    out = np.empty(x.size, dtype=RING_DTYPES[ring_bits])
    quantise_into(x, out, clip_range, fractional_bits, ring_bits)
    return out


def signed_integers(ring_vec: np.ndarray) -> np.ndarray:
    """Two's-complement reading of a ring vector (the exact integer sum, given the headroom rule)."""
    return ring_vec.view(SIGNED_DTYPES[ring_vec.dtype.itemsize * 8])


def release_into(values: np.ndarray, out: np.ndarray, fractional_bits: int, kernel=KERNEL) -> tuple[int, int]:
    """``out[...] = values * 2^-f`` in float64 and the ``(min, max)`` of ``values`` (a non-empty signed reading of a
    ring chunk): the server's release of an unmasked chunk and its range check, in one pass of the compiled kernel
    for the 32-bit ring where there is one (the same floats as numpy's: a power-of-two scale is exact, tested)."""
    scale = 2.0**-fractional_bits
    if kernel is not None and values.dtype == np.int32 and values.flags.c_contiguous and out.flags.c_contiguous:
        return kernel.dequantise_i32_f64(values, out, scale)
    np.multiply(values, scale, out=out)
    return int(values.min()), int(values.max())


def dequantise(ring_sum: np.ndarray, fractional_bits: int) -> np.ndarray:
    # One pass into one new float64 array; a power-of-two scale is exact, so this equals the division.
    return np.multiply(signed_integers(ring_sum), 2.0**-fractional_bits, dtype=np.float64)
