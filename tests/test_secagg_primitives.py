"""Building blocks of the masking backend: Shamir, graph, identities, messages, quantisation, PRG."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fedse_secure.secagg.masking import (
    AuthenticationError,
    EncryptedShares,
    IdentityKey,
    KeyAdvertisement,
    KeysBroadcast,
    MaskedInput,
    ProtocolError,
    PublicKeyRegistry,
    SecureAggregationError,
    SetupRequest,
    UnmaskShares,
    decode,
)
from fedse_secure.secagg.masking import shamir
from fedse_secure.secagg.masking.graph import default_threshold, neighbour_sets, resolve_degree
from fedse_secure.secagg.masking.prg import RandomSource, expand_mask
from fedse_secure.secagg.masking.quantize import dequantise, quantise, required_ring_bits, signed_integers


def test_shamir_any_threshold_subset_recovers_and_fewer_do_not():
    rng = RandomSource.seeded(1)
    secret = rng.bytes(32)
    xs = [1, 2, 3, 5, 8, 13]
    shares = shamir.split(secret, 4, xs, rng)
    for subset in itertools.combinations(shares.values(), 4):
        assert shamir.combine(list(subset), 4) == secret
    with pytest.raises(SecureAggregationError, match="need 4 distinct shares"):
        shamir.combine(list(shares.values())[:3], 4)
    # Three shares interpolated as if t were 3 give an unrelated value: t-1 shares reveal nothing usable.
    try:
        assert shamir.combine(list(shares.values())[:3], 3) != secret
    except SecureAggregationError:
        pass


def test_shamir_rejects_corrupt_share():
    rng = RandomSource.seeded(2)
    shares = list(shamir.split(bytes(range(32)), 2, [1, 2], rng).values())
    with pytest.raises(SecureAggregationError):
        shamir.combine([shares[0][:10], shares[1]], 2)


def test_graph_is_regular_symmetric_and_full_for_small_n():
    names = [f"c{i}" for i in range(50)]
    k = resolve_degree(50, None)
    assert k == 2 * math.ceil(math.log2(50))
    g = neighbour_sets(names, k, b"s" * 32)
    assert all(len(v) == k for v in g.values())
    assert all(a in g[b] for a in g for b in g[a])
    assert resolve_degree(10, None) == 9
    full = neighbour_sets(names[:10], 9, b"s" * 32)
    assert all(len(v) == 9 for v in full.values())
    assert resolve_degree(1000, None) == 20
    assert resolve_degree(50, 5) == 6  # the ring lattice needs an even degree
    assert default_threshold(3) == 3 and default_threshold(10) == 7 and default_threshold(21) == 15


def test_identity_pem_roundtrip_with_and_without_passphrase(tmp_path):
    key = IdentityKey.generate()
    key.save(tmp_path / "a.pem")
    assert IdentityKey.load(tmp_path / "a.pem").public_bytes() == key.public_bytes()
    assert (tmp_path / "a.pem").stat().st_mode & 0o777 == 0o600
    key.save(tmp_path / "b.pem", passphrase=b"pw")
    assert IdentityKey.load(tmp_path / "b.pem", passphrase=b"pw").public_bytes() == key.public_bytes()
    with pytest.raises(SecureAggregationError, match="passphrase"):
        IdentityKey.load(tmp_path / "b.pem", passphrase=b"wrong")
    with pytest.raises(SecureAggregationError, match="no identity key file"):
        IdentityKey.load(tmp_path / "missing.pem")
    reg = PublicKeyRegistry({"a": key.public_key})
    reg2 = PublicKeyRegistry.from_json(reg.to_json())
    sig = key.sign(b"hello")
    reg2.verify("a", sig, b"hello", "test")
    with pytest.raises(AuthenticationError, match="does not verify"):
        reg2.verify("a", sig, b"hullo", "test")
    with pytest.raises(AuthenticationError, match="not in the public-key registry"):
        reg2.verify("b", sig, b"hello", "test")


def test_messages_roundtrip_and_reject_garbage():
    adv = KeyAdvertisement(round_id=3, sender="a", mask_public_key=b"1" * 32, enc_public_key=b"2" * 32,
                           seed_commitment=b"3" * 32, signature=b"4" * 64)
    msgs = [
        SetupRequest(round_id=3, participants=["a", "b", "c"], threshold=3, degree=2, ring_bits=32, vector_len=5,
                     graph_seed=b"x" * 32),
        adv,
        KeysBroadcast(round_id=3, adverts=[adv, adv]),
        EncryptedShares(round_id=3, sender="a", ciphertexts={"b": b"\x00\x01", "c": b""}),
        MaskedInput(round_id=3, sender="a", vector=np.arange(7, dtype=np.uint64)),
        UnmaskShares(round_id=3, sender="a", seed_shares={"a": b"s"}, key_shares={}),
    ]
    for m in msgs:
        back = decode(m.to_bytes())
        assert type(back) is type(m)
        if isinstance(m, MaskedInput):
            assert np.array_equal(back.vector, m.vector) and back.vector.dtype == np.uint64
        else:
            assert back == m
    assert SetupRequest.from_bytes(msgs[0].to_bytes()).digest() == msgs[0].digest()
    with pytest.raises(ProtocolError, match="expected a SetupRequest"):
        SetupRequest.from_bytes(adv.to_bytes())
    with pytest.raises(ProtocolError, match="bad magic"):
        decode(b"nonsense")
    with pytest.raises(ProtocolError):
        decode(adv.to_bytes()[:-5])
    d = adv.to_dict()
    assert KeyAdvertisement.from_dict(d) == adv  # the dict form (hex bytes) also round-trips
    d["round_id"] = "x"
    with pytest.raises(ProtocolError, match="round_id"):
        KeyAdvertisement.from_dict(d)
    d = adv.to_dict()
    d["extra"] = 1
    with pytest.raises(ProtocolError, match="do not match"):
        KeyAdvertisement.from_dict(d)


def test_ring_headroom_and_exact_extremes():
    assert required_ring_bits(10, 8.0, 24) == 32
    assert required_ring_bits(16, 8.0, 24) == 64  # 16 * 2^27 = 2^31 does not fit the signed 32-bit range
    assert required_ring_bits(10, 1.0, 8, vector_len=300_000_000) == 64  # the clipped counts need room too
    with pytest.raises(SecureAggregationError, match="overflows a 64-bit ring"):
        required_ring_bits(2**21, 8.0, 40)
    n = 15
    bits = required_ring_bits(n, 8.0, 24)
    for v in (8.0, -8.0):
        q = quantise(np.full(4, v, np.float32), 8.0, 24, bits)
        total = np.zeros(4, q.dtype)
        for _ in range(n):
            total += q
        assert np.all(dequantise(total, 24) == n * v)
    q = quantise(np.array([0.1, -0.25, 3.0], np.float64), 8.0, 24, 64)
    assert np.array_equal(signed_integers(q), np.rint(np.array([0.1, -0.25, 3.0]) * 2**24).astype(np.int64))


def test_prg_is_deterministic_and_key_dependent():
    a = expand_mask(b"k" * 16, 100_001, np.uint32)
    assert np.array_equal(a, expand_mask(b"k" * 16, 100_001, np.uint32))
    assert not np.array_equal(a[:1000], expand_mask(b"j" * 16, 1000, np.uint32))
    # Chunked streaming gives the same keystream as one call: the prefix of a longer mask equals a shorter one.
    assert np.array_equal(a[:70_000], expand_mask(b"k" * 16, 70_000, np.uint32))
