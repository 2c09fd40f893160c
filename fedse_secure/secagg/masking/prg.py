"""Key derivation, mask expansion and randomness, built on the ``cryptography`` package (mask expansion on the
compiled ``_kernels``, or its numpy reference where that is not built).

* Masks are AEGIS-128X2 keystreams (RFC 10032's stream-cipher use, in 64 KiB segments each under its own nonce:
  :mod:`fedse_secure.secagg.masking.aegis`). A mask key is used for exactly one round: keys are derived with
  HKDF-SHA256 whose ``info`` binds the round's setup digest, so every (key, nonce) pair encrypts once. The
  compiled kernel adds every keystream to the vector without writing it to memory: with VAES and AVX-512VL
  (256-bit registers, two states interleaved; 43-45 GB/s of keystream a core on the AMD EPYC VM, against 21-23 for
  the AES-128-CTR masks this replaced), else with AES-NI or the Armv8 Cryptographic Extension (128-bit registers,
  11 GB/s with AES-NI). Without any, the numpy reference makes the same bytes (tested), 300-1,200x slower.
* :class:`InputTag` authenticates a masked input: AES-GMAC (AES-GCM over associated data only, 11-20 GB/s per
  core with PCLMUL, 40 on the Intel Xeon VM's VPCLMULQDQ for a cached 256 KiB chunk), fed chunk by chunk while
  the chunk is still in cache. Its key is used for one message only, so
  a fixed nonce is safe.
* :class:`RandomSource` is where every random byte of the protocol comes from: ``os.urandom`` in
  production, or a ChaCha20 keystream under a seed for reproducible tests (never use a seed in production).
"""

from __future__ import annotations

import hashlib
import os
import secrets

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedse_secure.secagg.masking import aegis

# v2: masks are AEGIS-128X2 keystreams (v1: AES-128-CTR). The setup digest starts with this, so parties of the
# two versions never agree on a setup instead of summing masks that do not cancel.
DOMAIN = b"fedse-secagg/v2"

#: Elements per chunk when masks are streamed: 64 Ki elements = 256/512 KiB, so the output chunk and the
#: keystream chunk both stay in L2 while every mask of a client is added to them.
CHUNK_ELEMENTS = 1 << 16


def _load_kernels():
    try:
        from fedse_secure.secagg.masking import _kernels
    except ImportError:  # not compiled here (no C compiler at install time, or not x86-64)
        return None, None
    return (_kernels if _kernels.supported() else None), (_kernels if _kernels.mask_level() else None)


#: KERNEL: the compiled AVX-512 kernels (quantisation, release), or None where they are not built or this CPU
#: lacks VAES/AVX-512. MASK_KERNEL: the compiled masks (x86-64 with AES-NI, 64-bit ARM with AES), or None.
KERNEL, MASK_KERNEL = _load_kernels()


def hkdf(key_material: bytes, label: bytes, context: bytes, length: int = 16) -> bytes:
    """HKDF-SHA256 with a domain-separated ``info`` (label) bound to ``context`` (the round's setup digest)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=DOMAIN + b"/" + label + b"/" + context).derive(
        key_material
    )


class MaskStream:
    """A mask: the AEGIS-128X2 keystream of ``key`` read as ring elements (uint32 or uint64), from its start.

    ``sign`` is +1 or -1: how the mask enters the vector it is applied to.
    """

    __slots__ = ("key", "dtype", "sign")

    def __init__(self, key: bytes, dtype: np.dtype, sign: int = 1) -> None:
        if len(key) != 16:
            raise ValueError(f"mask key must be 16 bytes, got {len(key)}")
        if sign not in (1, -1):
            raise ValueError(f"mask sign must be +1 or -1, got {sign}")
        self.key = bytes(key)
        self.dtype = np.dtype(dtype)
        self.sign = sign


class MaskApplier:
    """Applies many masks to one ring vector, chunk-major so the data stays in cache.

    ``kernel``: the compiled mask kernel (default: :data:`MASK_KERNEL`, where this machine has it), or None for
    the numpy reference. The two produce identical vectors.
    """

    def __init__(self, dtype: np.dtype, chunk: int = CHUNK_ELEMENTS, kernel=MASK_KERNEL) -> None:
        self.dtype = np.dtype(dtype)
        if (chunk * self.dtype.itemsize) % aegis.STEP_BYTES:
            raise ValueError(f"a chunk must hold whole {aegis.STEP_BYTES}-byte keystream steps")
        self.chunk = chunk
        self.kernel = kernel
        self.keystream_bytes = 0

    def apply(self, vec: np.ndarray, streams: list[MaskStream], before_chunk=None, after_chunk=None,
              reverse: bool = False) -> None:
        """``vec += sum(sign * stream)`` in the ring. ``before_chunk(start, stop, view)`` fills a chunk first
        (the client quantises its update into the chunk there, so the input is read exactly once) and may return
        a buffer the kernel brings into cache while it adds this chunk's masks (the next chunk's input: the AES
        rounds then hide the memory reads; the kernel also brings in the next chunk of ``vec`` itself, ready to be
        written); ``after_chunk(start, view)`` sees the finished chunk while it is in cache (the client tags it
        there). ``reverse``: the last chunk first (the server releases the sum into the memory that holds it,
        which needs that order)."""
        n = vec.size
        itemsize = self.dtype.itemsize
        # The kernel writes through the buffer protocol, which needs contiguous memory; a strided view takes
        # the reference path (the same result).
        if self.kernel is not None and vec.flags.c_contiguous:
            keys = b"".join(s.key for s in streams)
            subtract = bytes(1 if s.sign < 0 else 0 for s in streams)
            add = self.kernel.add_keystreams

            def add_masks(view: np.ndarray, start: int, warm, upcoming) -> None:
                add(view, keys, subtract, start * itemsize, itemsize, warm, upcoming)
        else:
            keys = [s.key for s in streams]

            def add_masks(view: np.ndarray, start: int, warm, upcoming) -> None:
                masks = aegis.keystreams(keys, start * itemsize, view.size * itemsize).view(self.dtype)
                for s, mask in zip(streams, masks):
                    if s.sign > 0:
                        np.add(view, mask, out=view)
                    else:
                        np.subtract(view, mask, out=view)

        starts = range(0, n, self.chunk)
        order = list(reversed(starts) if reverse else starts)
        for i, start in enumerate(order):
            view = vec[start : min(start + self.chunk, n)]
            warm = before_chunk(start, start + view.size, view) if before_chunk is not None else None
            # The chunk after this one is brought into cache ready to be written while these masks are added.
            upcoming = vec[order[i + 1] : order[i + 1] + self.chunk] if i + 1 < len(order) else None
            add_masks(view, start, warm, upcoming)
            if after_chunk is not None:
                after_chunk(start, view)
        self.keystream_bytes += n * itemsize * len(streams)


class InputTag:
    """AES-GMAC over a header, then a ring vector chunk by chunk: the tag of a masked input."""

    __slots__ = ("_ctx",)

    def __init__(self, key: bytes, header: bytes) -> None:
        self._ctx = Cipher(algorithms.AES(key), modes.GCM(b"\x00" * 12)).encryptor()
        self._ctx.authenticate_additional_data(header)

    def update(self, chunk: np.ndarray) -> None:
        self._ctx.authenticate_additional_data(memoryview(chunk).cast("B"))

    def tag(self) -> bytes:
        self._ctx.finalize()
        return self._ctx.tag


def expand_mask(key: bytes, size: int, dtype: np.dtype, kernel=MASK_KERNEL) -> np.ndarray:
    """The whole keystream of ``key`` as ``size`` ring elements (for tests and one-off uses)."""
    out = np.zeros(size, dtype=dtype)
    MaskApplier(dtype, kernel=kernel).apply(out, [MaskStream(key, dtype, +1)])
    return out


class RandomSource:
    """Randomness for keys, seeds, nonces and Shamir coefficients.

    ``RandomSource()`` uses the operating system CSPRNG. ``RandomSource.seeded(seed, label)`` is a
    deterministic ChaCha20 keystream for reproducible tests; it must never be used in production.
    """

    def __init__(self, seed: int | None = None, label: str = "") -> None:
        self.deterministic = seed is not None
        if seed is not None:
            key = hashlib.sha256(DOMAIN + b"/test-rng/" + str(seed).encode() + b"/" + label.encode()).digest()
            self._enc = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), None).encryptor()

    @classmethod
    def seeded(cls, seed: int, label: str = "") -> RandomSource:
        return cls(seed, label)

    def child(self, label: str) -> RandomSource:
        """An independent source for one party (a fresh OS source in production)."""
        if not self.deterministic:
            return RandomSource()
        return RandomSource(int.from_bytes(self.bytes(16), "big"), label)

    def bytes(self, n: int) -> bytes:
        if not self.deterministic:
            return os.urandom(n)
        return self._enc.update(b"\x00" * n)

    def below(self, bound: int) -> int:
        """Uniform integer in ``[0, bound)`` (rejection sampling, no modulo bias)."""
        if not self.deterministic:
            return secrets.randbelow(bound)
        nbits = bound.bit_length()
        nbytes = (nbits + 7) // 8
        excess = nbytes * 8 - nbits
        while True:
            v = int.from_bytes(self.bytes(nbytes), "big") >> excess
            if v < bound:
                return v
