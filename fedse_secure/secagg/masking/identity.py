"""Long-term Ed25519 identities of the institutions, and the registry of their public keys.

Each institution holds an :class:`IdentityKey` (generated once, kept as a PEM file, optionally encrypted with
a passphrase). The coordinator distributes the :class:`PublicKeyRegistry` out of band (e.g. with the
federation config); every client verifies every other client's key advertisement and survivor-list
signature against it, which is what stops a server from substituting its own keys (a man in the middle).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedse_secure.secagg.masking.errors import AuthenticationError, SecureAggregationError
from fedse_secure.secagg.masking.prg import RandomSource


class IdentityKey:
    """An institution's long-term Ed25519 signing key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def generate(cls, rng: RandomSource | None = None) -> IdentityKey:
        if rng is not None and rng.deterministic:
            return cls(Ed25519PrivateKey.from_private_bytes(rng.bytes(32)))
        return cls(Ed25519PrivateKey.generate())

    def save(self, path: str | Path, passphrase: bytes | None = None) -> None:
        """Write the private key as PKCS#8 PEM (encrypted when ``passphrase`` is given), mode 0600."""
        enc = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
        path = Path(path)
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_bytes(pem)

    @classmethod
    def load(cls, path: str | Path, passphrase: bytes | None = None) -> IdentityKey:
        path = Path(path)
        if not path.is_file():
            raise SecureAggregationError(f"{path}: no identity key file; create one with IdentityKey.generate().save()")
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=passphrase)
        except (ValueError, TypeError) as err:
            raise SecureAggregationError(
                f"{path}: not a readable PEM private key ({err}); check the file and the passphrase"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SecureAggregationError(f"{path}: holds a {type(key).__name__}, expected an Ed25519 private key")
        return cls(key)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def public_bytes(self) -> bytes:
        return self.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# Every institution verifies every key advertisement of a round (the graph is drawn from all of them). In a
# deployment each institution is its own process and this cache never hits across them; in a simulation, where
# all parties share a process, it turns n^2 identical verifications into n. Verification is a deterministic
# function of (key, signature, message), so a cached answer is the answer.
@functools.lru_cache(maxsize=1 << 15)
def _verifies(public_key: bytes, signature: bytes, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


class PublicKeyRegistry:
    """Institution name -> Ed25519 public key, as every party trusts it."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey | bytes] | None = None) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._raw: dict[str, bytes] = {}
        for name, key in (keys or {}).items():
            self.add(name, key)

    @classmethod
    def from_identities(cls, identities: Mapping[str, IdentityKey]) -> PublicKeyRegistry:
        return cls({name: ident.public_key for name, ident in identities.items()})

    def add(self, name: str, key: Ed25519PublicKey | bytes) -> None:
        if isinstance(key, bytes):
            key = Ed25519PublicKey.from_public_bytes(key)
        self._keys[name] = key
        self._raw[name] = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def names(self) -> list[str]:
        return sorted(self._keys)

    def public_bytes(self, name: str) -> bytes:
        self._get(name)
        return self._raw[name]

    def _get(self, name: str) -> Ed25519PublicKey:
        key = self._keys.get(name)
        if key is None:
            raise AuthenticationError(
                f"{name!r} is not in the public-key registry; add its Ed25519 public key to the registry "
                "before it can take part"
            )
        return key

    def verify(self, name: str, signature: bytes, data: bytes, what: str) -> None:
        if not _verifies(self.public_bytes(name), bytes(signature), bytes(data)):
            raise AuthenticationError(
                f"{what}: the signature of {name!r} does not verify against its registered identity key "
                "(tampered message, or a key substituted in transit); the message is rejected"
            )

    # JSON form (hex public keys), for shipping the registry with a federation config.
    def to_json(self) -> str:
        return json.dumps({n: self.public_bytes(n).hex() for n in self.names()}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> PublicKeyRegistry:
        return cls({n: bytes.fromhex(h) for n, h in json.loads(text).items()})
