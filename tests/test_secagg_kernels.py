"""The compiled masking kernels (fedse_secure/secagg/masking/_kernels.c) against their reference paths.

Both must give the very bytes of the `cryptography` + numpy path: a client on a machine with the kernel and one
without must produce masks that cancel, and the same integers for the same update.
"""

from __future__ import annotations

import os
import platform

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedse_secure.secagg.base import InvalidUpdateError
from fedse_secure.secagg.masking.prg import KERNEL, MaskApplier, MaskStream, expand_mask
from fedse_secure.secagg.masking.quantize import ChunkQuantiser, quantise, release_into, signed_integers


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


needs_kernel = pytest.mark.skipif(KERNEL is None, reason="no VAES/AVX-512 kernel on this machine")


def test_the_kernel_is_built_wherever_the_cpu_can_run_it():
    # setup.py marks the extension optional, so a failed compile would otherwise pass silently and cost 3x.
    if platform.machine() != "x86_64" or not {"vaes", "avx512f", "avx512bw", "aes"} <= _cpu_flags():
        pytest.skip("this CPU cannot run the VAES kernel")
    assert KERNEL is not None, "the _kernels extension did not build or load; reinstall with a C compiler (make venv)"


@needs_kernel
def test_kernel_keystream_is_openssl_aes_128_ctr_from_the_zero_counter():
    key = os.urandom(16)
    n = 1000 * 16 + 3  # not a whole number of 64-byte groups: the tail path too
    ref = np.frombuffer(Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor().update(bytes(4 * n)), np.uint32)
    assert np.array_equal(expand_mask(key, n, np.uint32, kernel=KERNEL), ref)
    assert np.array_equal(expand_mask(key, n, np.uint32, kernel=None), ref)
    # A later counter block: the keystream from block 1000 on is what AES-ECB makes of the counters 1000, 1001, ...
    v = np.zeros(8, np.uint32)
    KERNEL.add_keystreams(v, key, b"\0", 1000, 4)
    counters = b"".join(i.to_bytes(16, "big") for i in (1000, 1001))
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(counters)
    assert v.tobytes() == ecb


@needs_kernel
@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("size", [1, 3, 15, 16, 17, 127, 128, 129, 4097, 65_536 + 5, 200_003])
def test_kernel_and_reference_apply_identical_masks(dtype, size):
    rng = np.random.default_rng(size)
    streams = [MaskStream(rng.bytes(16), dtype, int(s)) for s in rng.choice([-1, 1], 6)]
    base = rng.integers(0, np.iinfo(dtype).max, size, dtype=dtype, endpoint=True)
    fast, ref = base.copy(), base.copy()
    MaskApplier(dtype, kernel=KERNEL).apply(fast, streams)
    MaskApplier(dtype, kernel=None).apply(ref, streams)
    assert np.array_equal(fast, ref)
    # Chunk boundaries that are not a multiple of the kernel's 512-byte groups: the counter must carry over.
    odd = base.copy()
    MaskApplier(dtype, chunk=4 * 1024 + 4, kernel=KERNEL).apply(odd, streams)
    assert np.array_equal(odd, ref)
    for kernel in (KERNEL, None):  # last chunk first (the server's order): each chunk finds its own counter
        backwards = base.copy()
        MaskApplier(dtype, chunk=4 * 1024 + 4, kernel=kernel).apply(backwards, streams, reverse=True)
        assert np.array_equal(backwards, ref)


@needs_kernel
def test_masks_cancel_between_a_kernel_client_and_a_reference_client():
    key = os.urandom(16)
    x = np.arange(100_000, dtype=np.uint32)
    a, b = x.copy(), np.zeros_like(x)
    MaskApplier(np.uint32, kernel=KERNEL).apply(a, [MaskStream(key, np.uint32, +1)])
    MaskApplier(np.uint32, kernel=None).apply(b, [MaskStream(key, np.uint32, -1)])
    assert np.array_equal(a + b, x)


@needs_kernel
def test_kernel_rejects_bad_arguments_without_touching_memory():
    v = np.zeros(16, np.uint32)
    with pytest.raises(ValueError, match="16 bytes"):
        KERNEL.add_keystreams(v, b"short", b"\0", 0, 4)
    with pytest.raises(ValueError, match="subtract flag"):
        KERNEL.add_keystreams(v, bytes(32), b"\0", 0, 4)
    with pytest.raises(ValueError, match="4 or 8"):
        KERNEL.add_keystreams(v, bytes(16), b"\0", 0, 2)
    with pytest.raises(ValueError, match="whole number"):
        KERNEL.add_keystreams(np.zeros(3, np.uint32), bytes(16), b"\0", 0, 8)
    with pytest.raises((BufferError, TypeError)):
        KERNEL.add_keystreams(bytes(64), bytes(16), b"\0", 0, 4)  # read-only
    with pytest.raises(OverflowError):
        KERNEL.add_keystreams(v, bytes(16), b"\0", 2**64 - 2, 4)
    with pytest.raises(ValueError, match="float32"):
        KERNEL.quantise_f32_i32(np.zeros(4, np.float32), np.zeros(5, np.uint32), 8.0, 2.0**24)
    out = np.zeros(4, np.float64)
    with pytest.raises(ValueError, match="as many float64"):
        KERNEL.dequantise_i32_f64(np.ones(5, np.int32), out, 1.0)
    with pytest.raises(ValueError, match="at least one"):
        KERNEL.dequantise_i32_f64(np.ones(0, np.int32), out[:0], 1.0)
    assert not v.any() and not out.any()


def _ref_quantise(x: np.ndarray, clip: float, f: int) -> tuple[np.ndarray, int]:
    out = np.empty(x.size, np.uint32)
    q = ChunkQuantiser(x, clip, f, 32, "ref", kernel=None)
    q(0, x.size, out)
    return out, q.values_clipped


@needs_kernel
@pytest.mark.parametrize("f", [24, 18])
def test_kernel_quantiser_gives_numpys_integers_and_clipped_count(f):
    rng = np.random.default_rng(f)
    x = (rng.standard_normal(100_003) * 3).astype(np.float32)  # a few percent beyond +-8
    # Exact ties at 2^-f / 2 apart: round half to even, as numpy's rint.
    x[:8] = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.0, -0.0], np.float32) * np.float32(2.0**-f)
    x[8:12] = [8.0, -8.0, np.nextafter(np.float32(8), np.float32(9)), -np.float32(1e30)]
    fast = np.empty(x.size, np.uint32)
    q = ChunkQuantiser(x, 8.0, f, 32, "fast", kernel=KERNEL)
    q(0, x.size, fast)
    ref, clipped = _ref_quantise(x, 8.0, f)
    assert np.array_equal(fast, ref)
    assert q.values_clipped == clipped == int(np.count_nonzero(np.abs(x) > 8))
    assert list(signed_integers(fast[:6])) == [0, 2, 2, 0, -2, -2]
    # The shared encoding used by every other backend agrees too.
    assert np.array_equal(fast, quantise(x, 8.0, f, 32))


@needs_kernel
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_kernel_quantiser_refuses_nan_and_inf_like_the_reference(bad):
    x = np.zeros(1000, np.float32)
    x[777] = bad
    for kernel in (KERNEL, None):
        with pytest.raises(InvalidUpdateError, match="NaN/Inf"):
            ChunkQuantiser(x, 8.0, 24, 32, "inst0", kernel=kernel)(0, x.size, np.empty(x.size, np.uint32))


@needs_kernel
def test_kernel_quantiser_refuse_mode_names_no_value():
    x = np.zeros(100, np.float32)
    x[5] = 123.456
    with pytest.raises(InvalidUpdateError) as err:
        ChunkQuantiser(x, 8.0, 24, 32, "inst0", refuse=True, kernel=KERNEL)(0, x.size, np.empty(x.size, np.uint32))
    assert "123" not in str(err.value) and "clip_range" in str(err.value)


@needs_kernel
def test_a_strided_vector_is_masked_like_a_contiguous_one():
    streams = [MaskStream(bytes(range(16)), np.uint32, +1)]
    strided = np.zeros(2000, np.uint32)[::2]
    MaskApplier(np.uint32, kernel=KERNEL).apply(strided, streams)
    assert np.array_equal(strided, expand_mask(bytes(range(16)), 1000, np.uint32, kernel=None))


@needs_kernel
@pytest.mark.parametrize("size", [1, 15, 16, 17, 65_536 + 5])
@pytest.mark.parametrize("offset", [0, 1])  # 1: the destination is not 64-byte aligned (no streaming stores)
def test_kernel_release_gives_numpys_floats_and_extremes(size, offset):
    rng = np.random.default_rng(size)
    values = rng.integers(-(2**31), 2**31, size, dtype=np.int64).astype(np.int32)
    values[size // 2] = np.iinfo(np.int32).min if size > 2 else values[0]
    fast = np.zeros(size + offset, np.float64)[offset:]
    ref = np.zeros(size, np.float64)
    got = release_into(values, fast, 24, kernel=KERNEL)
    want = release_into(values, ref, 24, kernel=None)
    assert got == want == (int(values.min()), int(values.max()))
    assert fast.tobytes() == ref.tobytes()
    assert np.array_equal(fast, values.astype(np.float64) / 2**24)


@needs_kernel
def test_warming_the_next_chunks_changes_nothing_but_the_timing():
    # The applier passes the next chunk of the client's update as `warm` and the next chunk of the vector as
    # `warm_out`: only prefetched, never written, never in the sum.
    keys, subtract = os.urandom(48), b"\0\1\0"
    plain, warmed = np.arange(4099, dtype=np.uint32), np.arange(4099, dtype=np.uint32)
    KERNEL.add_keystreams(plain, keys, subtract, 7, 4)
    next_input = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
    next_chunk = np.arange(6000, dtype=np.uint32)
    before, before_chunk = next_input.copy(), next_chunk.copy()
    KERNEL.add_keystreams(warmed, keys, subtract, 7, 4, next_input, next_chunk)
    assert np.array_equal(plain, warmed) and np.array_equal(next_input, before)
    assert np.array_equal(next_chunk, before_chunk)
    for extra in ((None,), (None, None), (next_input, None), (None, next_chunk)):
        again = np.arange(4099, dtype=np.uint32)
        KERNEL.add_keystreams(again, keys, subtract, 7, 4, *extra)
        assert np.array_equal(plain, again)
    KERNEL.add_keystreams(np.zeros(16, np.uint32), keys, subtract, 0, 4, bytes(3), bytes(5))  # read-only, short: fine
    for bad in ((12345,), (None, 12345), (None, None, None)):
        with pytest.raises(TypeError):
            KERNEL.add_keystreams(again, keys, subtract, 7, 4, *bad)
    assert np.array_equal(plain, again)


@needs_kernel
def test_the_quantiser_hands_the_next_chunk_of_the_update_to_the_mask_kernel():
    # The prefetch is only wired up if each chunk's quantiser call returns the next chunk's input.
    x = np.arange(10, dtype=np.float32)
    q = ChunkQuantiser(x, 8.0, 24, 32, "inst0", kernel=KERNEL)
    out = np.empty(11, np.uint32)
    assert np.array_equal(q(0, 4, out[:4]), x[4:8])
    assert q(8, 11, out[8:]) is None  # the last chunk (with the count) warms nothing
    assert ChunkQuantiser(x, 8.0, 24, 32, "inst0", kernel=None)(0, 4, out[:4]) is None
