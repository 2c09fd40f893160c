"""AEGIS-128X2 (RFC 10032) in numpy: the reference for the masks the compiled kernel makes.

A mask is the keystream of RFC 10032's stream-cipher use of AEGIS-128X2 (the encryption of zeros) under the
mask's 16-byte key, cut into segments of :data:`SEGMENT_BYTES`: segment ``s`` is the keystream under the nonce
``s`` (16 bytes, little-endian), so any part of a mask can be made without the parts before it. Mask keys are
used for one round only, so every (key, nonce) pair encrypts once, as AEGIS requires.

Why AEGIS and not AES-128-CTR: one state update costs 8 AES rounds and makes 64 bytes, where CTR spends 40
rounds on them; masking a client's update is mostly keystream (k + 1 masks of the whole vector), so this is the
cost that sets masking's speed (``benchmarks/secagg.py``).

This path runs where the compiled kernel does not (no C compiler at install time, a CPU without AES instructions:
AES-NI on x86-64, the Cryptographic Extension on 64-bit ARM, or another architecture). It is table-based, so
unlike the AES instructions it is not constant-time against a co-located cache-timing observer, and it makes
about 0.04 GB/s of keystream a core: 300x slower than the kernel's AES-NI path, 1,200x than its VAES one.
``fedse doctor`` says which path a machine takes. ``tests/test_secagg_kernels.py``
checks it against the RFC's test vectors and the kernel byte for byte.
"""

from __future__ import annotations

import numpy as np

SEGMENT_BYTES = 1 << 16
#: Keystream bytes one state update makes (2 lanes x 2 blocks of 16 bytes).
STEP_BYTES = 64
LANES = 2

_C0 = np.frombuffer(bytes.fromhex("000101020305080d1522375990e97962"), np.uint8)
_C1 = np.frombuffer(bytes.fromhex("db3d18556dc22ff12011314273b528dd"), np.uint8)


def _gf_mul(a: int, b: int) -> int:
    p = 0
    while b:
        if b & 1:
            p ^= a
        a = ((a << 1) ^ 0x11B) if a & 0x80 else a << 1
        b >>= 1
    return p


def _sbox() -> np.ndarray:
    """FIPS-197's S-box, computed (inverse in GF(2^8), then the affine map) rather than typed in."""
    box = np.zeros(256, np.uint32)
    for x in range(256):
        inv = 0
        if x:
            inv = 1
            for _ in range(254):
                inv = _gf_mul(inv, x)
        s = inv
        for shift in range(1, 5):
            s ^= ((inv << shift) | (inv >> (8 - shift))) & 0xFF
        box[x] = s ^ 0x63
    return box


def _tables() -> np.ndarray:
    """T[r][x]: the column (4 bytes, little-endian) that S-box output x in row r adds after MixColumns."""
    s = _sbox()
    s2 = np.array([_gf_mul(int(v), 2) for v in s], np.uint32)
    s3 = s2 ^ s
    rows = [(s2, s, s, s3), (s3, s2, s, s), (s, s3, s2, s), (s, s, s3, s2)]
    return np.stack([a | (b << 8) | (c << 16) | (d << 24) for a, b, c, d in rows]).astype(np.uint32)


_T = _tables()
# ShiftRows: output column c takes row r from input column c + r.
_SHIFTED = [np.array([4 * ((c + r) % 4) + r for c in range(4)]) for r in range(4)]


def aes_round(x: np.ndarray, rk: np.ndarray) -> np.ndarray:
    """AESRound(x, rk) = MixColumns(ShiftRows(SubBytes(x))) ^ rk on uint8 blocks of shape (..., 16)."""
    cols = _T[0][x[..., _SHIFTED[0]]]
    for r in range(1, 4):
        cols = cols ^ _T[r][x[..., _SHIFTED[r]]]
    return np.ascontiguousarray(cols.astype("<u4")).view(np.uint8) ^ rk


def _update(state: np.ndarray, m0: np.ndarray | None = None, m1: np.ndarray | None = None) -> np.ndarray:
    """One AEGIS-128L update of every lane; ``state`` is (..., 8, LANES, 16) and the messages (..., LANES, 16)."""
    rk = state.copy()
    if m0 is not None:
        rk[..., 0, :, :] ^= m0
        rk[..., 4, :, :] ^= m1
    return aes_round(np.roll(state, 1, axis=-3), rk)


def init(keys: np.ndarray, nonces: np.ndarray) -> np.ndarray:
    """The states after AEGIS-128X2's initialisation, (P, 8, LANES, 16), for P keys and nonces of (P, 16)."""
    k = np.repeat(keys[:, None, :], LANES, axis=1)
    n = np.repeat(nonces[:, None, :], LANES, axis=1)
    ctx = np.zeros((LANES, 16), np.uint8)
    ctx[:, 0], ctx[:, 1] = np.arange(LANES), LANES - 1
    s = np.empty((len(keys), 8, LANES, 16), np.uint8)
    s[:, 0], s[:, 1], s[:, 2], s[:, 3] = k ^ n, _C1, _C0, _C1
    s[:, 4], s[:, 5], s[:, 6], s[:, 7] = k ^ n, k ^ _C0, k ^ _C1, k ^ _C0
    for _ in range(10):
        s[:, 3] ^= ctx
        s[:, 7] ^= ctx
        s = _update(s, n, k)
    return s


def _z(state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = state
    return s[..., 6, :, :] ^ s[..., 1, :, :] ^ (s[..., 2, :, :] & s[..., 3, :, :]), (
        s[..., 2, :, :] ^ s[..., 5, :, :] ^ (s[..., 6, :, :] & s[..., 7, :, :]))


def encrypt(key: bytes, nonce: bytes, ad: bytes, msg: bytes) -> bytes:
    """AEGIS-128X2's ciphertext (without the tag), as RFC 10032 defines it: to check this code against the RFC's
    test vectors."""
    s = init(np.frombuffer(key, np.uint8)[None], np.frombuffer(nonce, np.uint8)[None])
    block = 2 * LANES * 16

    def blocks(data: bytes):
        padded = data + bytes(-len(data) % block)
        for i in range(0, len(padded), block):
            t = np.frombuffer(padded[i : i + block], np.uint8).reshape(1, 2, LANES, 16)
            yield t[:, 0], t[:, 1]

    for t0, t1 in blocks(ad):
        s = _update(s, t0, t1)
    out = []
    for t0, t1 in blocks(msg):
        z0, z1 = _z(s)
        out.append(np.concatenate([t0 ^ z0, t1 ^ z1], axis=1).tobytes())
        s = _update(s, t0, t1)
    return b"".join(out)[: len(msg)]


def keystreams(keys: list[bytes], offset: int, nbytes: int) -> np.ndarray:
    """Bytes ``[offset, offset + nbytes)`` of each key's mask, as a (len(keys), nbytes) uint8 array. Every
    segment involved runs in lockstep, one numpy pass per state update."""
    if nbytes <= 0 or not keys:
        return np.zeros((len(keys), max(nbytes, 0)), np.uint8)
    first, last = offset // SEGMENT_BYTES, (offset + nbytes - 1) // SEGMENT_BYTES
    segments = np.arange(first, last + 1, dtype=np.uint64)
    base = first * SEGMENT_BYTES
    steps = -(-(offset + nbytes - base) // STEP_BYTES) if first == last else SEGMENT_BYTES // STEP_BYTES
    key_bytes = np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), 16)
    nonces = np.zeros((len(segments), 16), np.uint8)
    nonces[:, :8] = segments.astype("<u8")[:, None].view(np.uint8)
    state = init(np.repeat(key_bytes, len(segments), axis=0), np.tile(nonces, (len(keys), 1)))
    out = np.empty((len(state), steps, STEP_BYTES), np.uint8)
    for i in range(steps):
        z0, z1 = _z(state)
        out[:, i, :32] = z0.reshape(-1, 32)
        out[:, i, 32:] = z1.reshape(-1, 32)
        state = _update(state)
    stream = out.reshape(len(keys), -1)
    return stream[:, offset - base : offset - base + nbytes]
