"""The compiled masking kernels (fedse_secure/secagg/masking/_kernels.c) against their reference paths.

Both must give the very bytes of the numpy path: a client on a machine with the kernel and one without must
produce masks that cancel, and the same integers for the same update. The numpy AEGIS-128X2 is checked against
RFC 10032's test vectors.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from fedse_secure.secagg.base import InvalidUpdateError
from fedse_secure.secagg.masking import aegis
from fedse_secure.secagg.masking.prg import KERNEL, MASK_KERNEL, MaskApplier, MaskStream, expand_mask
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
needs_mask_kernel = pytest.mark.skipif(MASK_KERNEL is None, reason="no mask kernel (AES-NI) on this machine")
# The mask kernel's paths this CPU runs: 1 (AES-NI), 2 (VAES with AVX-512VL); each must make the same bytes.
MASK_LEVELS = list(range(1, MASK_KERNEL.mask_level() + 1)) if MASK_KERNEL is not None else []


def test_the_kernel_is_built_wherever_the_cpu_can_run_it():
    # setup.py marks the extension optional, so a failed compile would otherwise pass silently and cost 3x.
    if platform.machine() != "x86_64" or "aes" not in _cpu_flags():
        pytest.skip("this CPU cannot run the mask kernel")
    assert MASK_KERNEL is not None, "the _kernels extension did not build or load; reinstall with a C compiler"
    if {"vaes", "avx512f", "avx512bw", "avx512vl"} <= _cpu_flags():
        assert KERNEL is not None and MASK_KERNEL.mask_level() == 2


# RFC 10032's vectors for AEGIS-128X2 and its AESRound (also in the reference implementations' test suites).
RFC_KEY, RFC_NONCE = bytes(range(16)), bytes(range(16, 32))
RFC_STATE_AFTER_INIT = {(0, 0): "a4fc1ad9a72942fb88bd2cabbba6509a", (0, 1): "80a40e392fc71084209b6c3319bdc6cc",
                        (3, 0): "85f94b0d4263bfa86fdf45a603d8b6ac", (5, 1): "61ad32a4694d6f3cca313a2d3f4687aa",
                        (7, 0): "ca549badf8faa58222412478598651cf", (7, 1): "3407279a54ce76d2e2e8a90ec5d108eb"}
RFC_AD, RFC_MSG = bytes.fromhex("0102030401020304"), bytes.fromhex("04050607" * 30)
RFC_CT = bytes.fromhex(
    "5795544301997f93621b278809d6331b3bfa6f18e90db12c4aa35965b5e98c5fc6fb4e54bcb6111842c20637252eff747cb3a8f85b"
    "37de80919a589fe0f24872bc926360696739e05520647e390989e1eb5fd42f99678a0276a498f8c454761c9d6aacb647ad56be62b2"
    "9c22cd4b5761b38f43d5a5ee062f")


def test_the_numpy_aegis_is_rfc_10032s_aegis_128x2():
    x, rk = np.frombuffer(bytes(range(16)), np.uint8), np.frombuffer(bytes(range(16, 32)), np.uint8)
    assert aegis.aes_round(x, rk).tobytes().hex() == "7a7b4e5638782546a8c0477a3b813f43"
    state = aegis.init(np.frombuffer(RFC_KEY, np.uint8)[None], np.frombuffer(RFC_NONCE, np.uint8)[None])
    for (block, lane), want in RFC_STATE_AFTER_INIT.items():
        assert state[0, block, lane].tobytes().hex() == want
    assert aegis.encrypt(RFC_KEY, RFC_NONCE, RFC_AD, RFC_MSG) == RFC_CT
    assert aegis.encrypt(RFC_KEY, RFC_NONCE, RFC_AD, RFC_MSG[:-1]) == RFC_CT[:-1]


def test_a_mask_is_the_rfc_keystream_segment_by_segment():
    # Segment s of a mask is the encryption of zeros under nonce s; any part can be made on its own.
    key = os.urandom(16)
    seg = aegis.SEGMENT_BYTES
    whole = aegis.keystreams([key], 0, 2 * seg + 640)[0].tobytes()
    assert whole[:256] == aegis.encrypt(key, bytes(16), b"", bytes(256))
    assert whole[seg : seg + 192] == aegis.encrypt(key, (1).to_bytes(16, "little"), b"", bytes(192))
    assert whole[2 * seg :] == aegis.encrypt(key, (2).to_bytes(16, "little"), b"", bytes(640))
    assert aegis.keystreams([key], seg - 128, 320)[0].tobytes() == whole[seg - 128 : seg + 192]
    two = aegis.keystreams([key, bytes(16)], 64, 100)
    assert two[0].tobytes() == whole[64:164] and two[1].tobytes() != two[0].tobytes()


@needs_mask_kernel
@pytest.mark.parametrize("level", MASK_LEVELS)
def test_kernel_masks_are_the_reference_keystream_at_any_offset(level):
    keys = [os.urandom(16) for _ in range(3)]
    seg = aegis.SEGMENT_BYTES
    # Whole segments, a start just before a segment's end, a length not a multiple of 64 bytes (the tail).
    for offset, n in [(0, 16), (0, 1000 * 16 + 3), (seg - 640, 40_000), (2 * seg, 200_003)]:
        ref = aegis.keystreams(keys, offset, 4 * n).view(np.uint32)
        v = np.zeros(n, np.uint32)
        MASK_KERNEL.add_keystreams(v, keys[0], b"\0", offset, 4, None, None, level)
        assert np.array_equal(v, ref[0])
        v = np.arange(n, dtype=np.uint32)
        MASK_KERNEL.add_keystreams(v, b"".join(keys), b"\0\1\0", offset, 4, None, None, level)
        assert np.array_equal(v, np.arange(n, dtype=np.uint32) + ref[0] - ref[1] + ref[2])
    v64 = np.zeros(5000, np.uint64)
    MASK_KERNEL.add_keystreams(v64, b"".join(keys[:2]), b"\1\0", 64, 8, None, None, level)
    ref64 = aegis.keystreams(keys[:2], 64, v64.nbytes).view(np.uint64)
    assert np.array_equal(v64, ref64[1] - ref64[0])


@needs_mask_kernel
@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("size", [1, 3, 15, 16, 17, 127, 128, 129, 4097, 65_536 + 5, 200_003])
def test_kernel_and_reference_apply_identical_masks(dtype, size):
    rng = np.random.default_rng(size)
    streams = [MaskStream(rng.bytes(16), dtype, int(s)) for s in rng.choice([-1, 1], 6)]
    base = rng.integers(0, np.iinfo(dtype).max, size, dtype=dtype, endpoint=True)
    fast, ref = base.copy(), base.copy()
    MaskApplier(dtype, kernel=MASK_KERNEL).apply(fast, streams)
    MaskApplier(dtype, kernel=None).apply(ref, streams)
    assert np.array_equal(fast, ref)
    # Chunks that end inside a keystream segment: the next chunk starts mid-segment.
    odd = base.copy()
    MaskApplier(dtype, chunk=4 * 1024 + 16, kernel=MASK_KERNEL).apply(odd, streams)
    assert np.array_equal(odd, ref)
    for kernel in (MASK_KERNEL, None):  # last chunk first (the server's order): each chunk finds its own segment
        backwards = base.copy()
        MaskApplier(dtype, chunk=4 * 1024 + 16, kernel=kernel).apply(backwards, streams, reverse=True)
        assert np.array_equal(backwards, ref)


def test_a_chunk_must_hold_whole_keystream_steps():
    with pytest.raises(ValueError, match="64-byte"):
        MaskApplier(np.uint32, chunk=1000)
    MaskApplier(np.uint64, chunk=1000)  # 8000 bytes


@needs_mask_kernel
def test_masks_cancel_between_a_kernel_client_and_a_reference_client():
    key = os.urandom(16)
    x = np.arange(100_000, dtype=np.uint32)
    a, b = x.copy(), np.zeros_like(x)
    MaskApplier(np.uint32, kernel=MASK_KERNEL).apply(a, [MaskStream(key, np.uint32, +1)])
    MaskApplier(np.uint32, kernel=None).apply(b, [MaskStream(key, np.uint32, -1)])
    assert np.array_equal(a + b, x)


@needs_kernel
def test_kernel_rejects_bad_arguments_without_touching_memory():
    v = np.zeros(16, np.uint32)
    with pytest.raises(ValueError, match="16 bytes"):
        MASK_KERNEL.add_keystreams(v, b"short", b"\0", 0, 4)
    with pytest.raises(ValueError, match="subtract flag"):
        MASK_KERNEL.add_keystreams(v, bytes(32), b"\0", 0, 4)
    with pytest.raises(ValueError, match="4 or 8"):
        MASK_KERNEL.add_keystreams(v, bytes(16), b"\0", 0, 2)
    with pytest.raises(ValueError, match="whole number"):
        MASK_KERNEL.add_keystreams(np.zeros(3, np.uint32), bytes(16), b"\0", 0, 8)
    with pytest.raises((BufferError, TypeError)):
        MASK_KERNEL.add_keystreams(bytes(64), bytes(16), b"\0", 0, 4)  # read-only
    with pytest.raises(ValueError, match="multiple of 64"):
        MASK_KERNEL.add_keystreams(v, bytes(16), b"\0", 16, 4)
    with pytest.raises(OverflowError):
        MASK_KERNEL.add_keystreams(v, bytes(16), b"\0", 2**64 - 64, 4)
    with pytest.raises(ValueError, match="level"):
        MASK_KERNEL.add_keystreams(v, bytes(16), b"\0", 0, 4, None, None, 3)
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


@needs_mask_kernel
def test_a_strided_vector_is_masked_like_a_contiguous_one():
    streams = [MaskStream(bytes(range(16)), np.uint32, +1)]
    strided = np.zeros(2000, np.uint32)[::2]
    MaskApplier(np.uint32, kernel=MASK_KERNEL).apply(strided, streams)
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


@needs_mask_kernel
def test_warming_the_next_chunks_changes_nothing_but_the_timing():
    # The applier passes the next chunk of the client's update as `warm` and the next chunk of the vector as
    # `warm_out`: only prefetched, never written, never in the sum.
    keys, subtract = os.urandom(48), b"\0\1\0"
    plain, warmed = np.arange(4099, dtype=np.uint32), np.arange(4099, dtype=np.uint32)
    MASK_KERNEL.add_keystreams(plain, keys, subtract, 448, 4)
    next_input = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
    next_chunk = np.arange(6000, dtype=np.uint32)
    before, before_chunk = next_input.copy(), next_chunk.copy()
    MASK_KERNEL.add_keystreams(warmed, keys, subtract, 448, 4, next_input, next_chunk)
    assert np.array_equal(plain, warmed) and np.array_equal(next_input, before)
    assert np.array_equal(next_chunk, before_chunk)
    for extra in ((None,), (None, None), (next_input, None), (None, next_chunk)):
        again = np.arange(4099, dtype=np.uint32)
        MASK_KERNEL.add_keystreams(again, keys, subtract, 448, 4, *extra)
        assert np.array_equal(plain, again)
    # Read-only and short warm buffers are fine: they are only prefetched.
    MASK_KERNEL.add_keystreams(np.zeros(16, np.uint32), keys, subtract, 0, 4, bytes(3), bytes(5))
    for bad in ((12345,), (None, 12345), (None, None, "2"), (None, None, None, None)):
        with pytest.raises(TypeError):
            MASK_KERNEL.add_keystreams(again, keys, subtract, 448, 4, *bad)
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


# The kernel's 64-bit ARM path, built with a cross compiler and run under qemu-user where both are installed
# (`apt-get install crossbuild-essential-arm64 qemu-user`); CI's x86 box has neither, so there it is skipped.
_ARM_HARNESS = r"""
#include "KERNEL_C"
#include <stdio.h>
int main(int argc, char **argv) {
    int nkeys = (int)strlen(argv[1]) / 32;
    uint8_t keys[16 * 8], subtract[8];
    for (int i = 0; i < 16 * nkeys; i++) sscanf(argv[1] + 2 * i, "%2hhx", &keys[i]);
    for (int k = 0; k < nkeys; k++) subtract[k] = argv[5][k] == '1';
    uint64_t offset = strtoull(argv[2], 0, 10);
    size_t nbytes = strtoull(argv[3], 0, 10);
    uint8_t *vec = calloc(nbytes, 1), *states = aligned_alloc(64, 256 * nkeys);
    printf("%d\n", mask_level());
    add_masks(0, vec, nbytes, keys, subtract, nkeys, offset, atoi(argv[4]) == 8, states, NULL, 0, NULL, 0);
    for (size_t i = 0; i < nbytes; i++) printf("%02x", vec[i]);
    printf("\n");
    return 0;
}
"""


@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")),
                    reason="no aarch64 cross compiler and qemu-user here")
def test_the_arm_path_makes_the_reference_masks(tmp_path):
    kernel_c = Path(__file__).resolve().parents[1] / "fedse_secure/secagg/masking/_kernels.c"
    (tmp_path / "harness.c").write_text(_ARM_HARNESS.replace("KERNEL_C", str(kernel_c)))
    # Static, with the Python API left unresolved: the harness calls only the C mask code.
    subprocess.run(["aarch64-linux-gnu-gcc", "-O2", "-static", f"-I{sysconfig.get_paths()['include']}",
                    str(tmp_path / "harness.c"), "-o", str(tmp_path / "harness"),
                    "-Wl,--unresolved-symbols=ignore-all"], check=True)
    keys = [os.urandom(16) for _ in range(3)]
    seg = aegis.SEGMENT_BYTES
    # One key; a start just before a segment's end and a partial last update; a 64-bit ring, subtracting.
    cases = [(0, 64, 4, "0"), (seg - 640, 4 * 20_003, 4, "010"), (2 * seg, 8 * 999, 8, "10")]
    for offset, nbytes, elem, signs in cases:
        n = len(signs)
        run = ["qemu-aarch64", str(tmp_path / "harness"), b"".join(keys[:n]).hex(), str(offset), str(nbytes),
               str(elem), signs]
        out = subprocess.run(run, check=True, capture_output=True, text=True).stdout.split()
        assert out[0] == "1"  # the Armv8 Cryptographic Extension was found and used
        dtype = np.uint32 if elem == 4 else np.uint64
        ref = aegis.keystreams(keys[:n], offset, nbytes).view(dtype)
        want = np.zeros(nbytes // elem, dtype)
        for mask, sign in zip(ref, signs):
            want = want - mask if sign == "1" else want + mask
        assert bytes.fromhex(out[1]) == want.tobytes()
