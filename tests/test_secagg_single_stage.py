"""The one-stage wire form (``none`` and ``crypten``): small and large bodies frame and unframe to the same bytes,
and the plaintext sum is exact whichever way its messages were framed."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from fedse_secure.secagg.backends.plaintext import PlaintextBackend
from fedse_secure.secagg.base import MessageRejected
from fedse_secure.secagg.driver import aggregate
from fedse_secure.secagg.single_stage import frame, unframe


@pytest.mark.parametrize("nbytes", [0, 1000, 1 << 20, (1 << 20) + 12])
def test_a_framed_body_comes_back_byte_for_byte(nbytes):
    body = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    data = frame({"round_id": 3, "dtype": "<f4"}, memoryview(body))
    header, got = unframe(data, "test")
    assert header == {"round_id": 3, "dtype": "<f4"}
    assert bytes(got) == body.tobytes()
    if nbytes >= 1 << 20:
        # Large bodies sit at a multiple of 64 bytes into the message (numpy's loops run at full speed there);
        # the padding is JSON whitespace.
        (head_len,) = struct.unpack(">I", bytes(memoryview(data)[:4]))
        assert (4 + head_len) % 64 == 0
        assert json.loads(bytes(memoryview(data)[4 : 4 + head_len])) == header


def test_a_truncated_large_message_is_rejected_with_one_line():
    data = frame({"round_id": 1}, bytes(1 << 20))
    with pytest.raises(MessageRejected, match="malformed message"):
        unframe(memoryview(data)[:3], "round 1")


def test_the_plaintext_sum_is_exact_for_large_and_small_inputs():
    rng = np.random.default_rng(0)
    for size in (10, 300_000):  # 40 B and 1.2 MB bodies: both framings
        inputs = {f"inst{i}": rng.standard_normal(size).astype(np.float32) for i in range(3)}
        res = aggregate(PlaintextBackend(), 1, inputs)
        want = sum(v.astype(np.float64) for v in inputs.values())
        assert res.total.dtype == np.float64 and np.array_equal(res.total, want)
