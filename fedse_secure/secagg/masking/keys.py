"""Key agreement and per-round key derivation shared by clients and server.

Every derivation is bound to the round's *session* (``graph.roster_digest``: the setup digest and every signed
key advertisement), except the seed commitment, which is made before the session exists and binds the setup
digest. An X25519 exchange that yields the all-zero secret (a low-order public key) raises ``ValueError``
here; callers turn it into an abort (institution) or a rejected message (coordinator).
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedse_secure.secagg.masking.messages import frame
from fedse_secure.secagg.masking.prg import RandomSource, hkdf


def new_x25519(rng: RandomSource) -> X25519PrivateKey:
    if rng.deterministic:
        return X25519PrivateKey.from_private_bytes(rng.bytes(32))
    return X25519PrivateKey.generate()


def x25519_private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def x25519_public_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def pair_mask_key(own_mask_key: X25519PrivateKey, peer_public: bytes, digest: bytes, a: str, b: str) -> bytes:
    """The 128-bit key of the pairwise mask between ``a`` and ``b`` (symmetric in a, b)."""
    shared = own_mask_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    lo, hi = sorted((a, b))
    return hkdf(shared, b"pair-mask", frame(digest, lo, hi), 16)


def share_encryption_key(own_enc_key: X25519PrivateKey, peer_public: bytes, digest: bytes, a: str, b: str) -> bytes:
    """AES-256-GCM key for the Shamir shares exchanged between ``a`` and ``b``."""
    shared = own_enc_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    lo, hi = sorted((a, b))
    return hkdf(shared, b"share-enc", frame(digest, lo, hi), 32)


def self_mask_key(seed: bytes, digest: bytes) -> bytes:
    return hkdf(seed, b"self-mask", digest, 16)


def seed_commitment(seed: bytes, digest: bytes, owner: str) -> bytes:
    return hashlib.sha256(frame("seed-commitment", digest, owner, seed)).digest()


def share_aad(digest: bytes, round_id: int, sender: str, receiver: str) -> bytes:
    return frame("share", digest, round_id, sender, receiver)


def input_tag_key(own_key: X25519PrivateKey, peer_public: bytes, session: bytes, sender: str) -> bytes:
    """AES-128 key of ``sender``'s masked-input tag: its share-encryption key with the coordinator's setup key
    (either side of the exchange derives the same key)."""
    shared = own_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return hkdf(shared, b"input-tag", frame(session, sender), 16)


def share_commitment(session: bytes, dealer: str, holder: str, kind: str, share: bytes) -> bytes:
    """SHA-256 commitment to the ``kind`` ("seed" or "key") share of ``dealer`` that ``holder`` holds."""
    return hashlib.sha256(frame("share-commitment", session, dealer, holder, kind, share)).digest()
