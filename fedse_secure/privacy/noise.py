"""Randomness for privacy mechanisms from a cryptographically secure generator.

Whoever can predict a mechanism's randomness can undo it: subtract the Gaussian noise, or tell which records
a Poisson sample drew. torch's and numpy's generators (Mersenne Twister, PCG64) are fast but not
cryptographically secure: enough of their output, or a guessed seed, gives away the rest. Opacus's answer is
``secure_mode`` with torchcsprng, which is not installable with torch 2.13, so this module provides the same
thing: a ChaCha20 keystream (the ``cryptography`` package, i.e. OpenSSL) keyed with 256 bits from the OS
CSPRNG and a fresh key per generator, turned into uniforms (53-bit) and, by the Box-Muller transform, into
normals.

:func:`SecureRandom.normal` follows Opacus's secure mode against floating-point attacks on the Gaussian
sampler (Mironov 2012; Jin et al. 2021, arXiv 2107.10138, §5.1): each value is the sum of four independent
draws of std ``s``, divided by 2 (std ``s`` again), which hides the gaps in the set of representable sampler
outputs that such attacks read.
"""

from __future__ import annotations

import os

import numpy as np

_TWO_PI = 2.0 * np.pi


class SecureRandom:
    """A ChaCha20 stream keyed from ``os.urandom``; never seeded from anything an adversary could know."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        key, nonce = os.urandom(32), os.urandom(16)
        self._stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()

    def _words(self, n: int) -> np.ndarray:
        return np.frombuffer(self._stream.update(bytes(8 * n)), dtype="<u8")

    def uniform(self, n: int) -> np.ndarray:
        """``n`` uniforms in (0, 1], 53 bits each (never 0, so the logarithm below is finite)."""
        return ((self._words(n) >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / 9007199254740992.0)

    def _standard_normal(self, n: int) -> np.ndarray:
        pairs = (n + 1) // 2
        u1, u2 = self.uniform(pairs), self.uniform(pairs)
        radius = np.sqrt(-2.0 * np.log(u1))
        out = np.empty(2 * pairs)
        out[0::2] = radius * np.cos(_TWO_PI * u2)
        out[1::2] = radius * np.sin(_TWO_PI * u2)
        return out[:n]

    def normal(self, std: float, shape) -> np.ndarray:
        """Gaussian noise of standard deviation ``std`` (float64), in Opacus's secure-mode form."""
        shape = tuple(shape) if not isinstance(shape, int) else (shape,)
        n = int(np.prod(shape)) if shape else 1
        total = np.zeros(n)
        for _ in range(4):
            total += self._standard_normal(n)
        return (total * (float(std) / 2.0)).reshape(shape)

    def poisson_mask(self, n: int, rate: float) -> np.ndarray:
        """Which of ``n`` records a Poisson sample at ``rate`` takes (each independently with probability rate)."""
        return self.uniform(n) <= rate
