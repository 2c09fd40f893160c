"""Building blocks of the masking backend: Shamir, graph, requirements, identities, messages, quantisation, PRG."""

from __future__ import annotations

import itertools

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
from fedse_secure.secagg.masking.graph import graph_seed, neighbour_sets, roster_digest
from fedse_secure.secagg.masking import aegis
from fedse_secure.secagg.masking.prg import MaskApplier, MaskStream, RandomSource, expand_mask
from fedse_secure.secagg.masking.quantize import (
    dequantise,
    fractional_bits_for,
    quantise,
    required_ring_bits,
    signed_integers,
)
from fedse_secure.secagg.masking.requirements import GraphParameters, MaskingRequirements


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


def test_graph_is_regular_symmetric_and_drawn_from_every_advertisement():
    names = [f"c{i}" for i in range(50)]
    g = neighbour_sets(names, 12, b"s" * 32)
    assert all(len(v) == 12 for v in g.values())
    assert all(a in g[b] for a in g for b in g[a])
    full = neighbour_sets(names[:10], 9, b"s" * 32)
    assert all(len(v) == 9 for v in full.values())
    adverts = [KeyAdvertisement(round_id=1, sender=n, mask_public_key=bytes([i]) * 32, enc_public_key=bytes([i + 1]) * 32,
                                seed_commitment=b"c" * 32, signature=b"s" * 64) for i, n in enumerate(names)]
    session = roster_digest(b"d" * 32, adverts)
    assert session == roster_digest(b"d" * 32, adverts[::-1])  # order of arrival does not matter
    changed = [KeyAdvertisement(**{**a.__dict__, "signature": b"t" * 64}) if a.sender == "c7" else a for a in adverts]
    # One advertisement more, less or different is another session and another graph.
    assert len({session, roster_digest(b"d" * 32, adverts[1:]), roster_digest(b"d" * 32, changed),
                roster_digest(b"e" * 32, adverts)}) == 4
    assert neighbour_sets(names, 12, graph_seed(session)) != neighbour_sets(names, 12, graph_seed(
        roster_digest(b"d" * 32, changed)))


def test_requirements_follow_bell_et_al_and_document_their_table():
    req = MaskingRequirements()
    table = {r["n"]: (r["degree"], r["threshold"]) for r in req.table((3, 5, 10, 40, 100, 1000))}
    # The table SECURITY.md documents for the defaults (10% colluders, 10% dropouts, 2^-40, 2^-20).
    assert table == {3: (2, 3), 5: (4, 4), 10: (6, 5), 40: (16, 12), 100: (34, 24), 1000: (108, 77)}
    for n in (5, 10, 40, 100, 1000):
        p = req.parameters(n)
        c = req.colluders(n)
        # A split survivor list needs 2t - m colluders in a neighbourhood; the derivation keeps that above the
        # colluders a neighbourhood can hold except with probability 2^-40 (here simply: above c when k = n - 1).
        assert p.tolerated_colluders == 2 * p.threshold - p.neighbourhood - 1
        assert p.threshold >= p.degree // 2 + 2 or p.degree == n - 1  # dropouts alone never cut the ring
        if p.degree == n - 1:
            assert p.tolerated_colluders >= c
    # Stricter assumptions only ever raise the parameters.
    strict = MaskingRequirements(colluder_fraction=0.2)
    assert strict.parameters(100).degree > req.parameters(100).degree
    assert MaskingRequirements(colluder_fraction=0.0).parameters(3) == GraphParameters(2, 2)
    assert req.refusal(40, 40, 16, 12) is None and req.refusal(40, 40, 20, 14) is None
    assert str(req.refusal(40, 40, 2, 2)).startswith("degree: 2 is below 16")
    weak = req.refusal(40, 40, 2, 2)
    assert (weak.parameter, weak.least.split(",")[0]) == ("degree", "16")
    assert str(req.refusal(5, 5, 4, 3)).startswith("threshold: 3 is below 4")
    assert str(req.refusal(2, 2, 1, 2)).startswith("participants:")
    # Dropping institutions before the graph is fixed raises the colluders' share: the bar goes up.
    assert str(req.refusal(1000, 600, 108, 77)).startswith("threshold: 77 is below")
    with pytest.raises(ValueError, match="exceeds 0.9"):
        MaskingRequirements(colluder_fraction=0.3, dropout_fraction=0.35)


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
                     nonce=b"n" * 32, server_key=b"k" * 32),
        adv,
        KeysBroadcast(round_id=3, adverts=[adv, KeyAdvertisement(**{**adv.__dict__, "sender": "é" * 3})]),
        EncryptedShares(round_id=3, sender="a", ciphertexts={"b": b"\x00\x01", "c": b""},
                        commitments={"a": b"c" * 64}, signature=b"s" * 64),
        MaskedInput(round_id=3, sender="a", vector=np.arange(7, dtype=np.uint64), tag=b"t" * 16),
        UnmaskShares(round_id=3, sender="a", seed_shares={"a": b"s"}, key_shares={}),
    ]
    for m in msgs:
        back = decode(m.to_bytes())
        assert type(back) is type(m)
        if isinstance(m, MaskedInput):
            assert np.array_equal(back.vector, m.vector) and back.vector.dtype == np.uint64 and back.tag == m.tag
        else:
            assert back == m
    assert SetupRequest.from_bytes(msgs[0].to_bytes()).digest() == msgs[0].digest()
    # A fresh nonce is a different setup.
    assert SetupRequest(**{**msgs[0].__dict__, "nonce": b"m" * 32}).digest() != msgs[0].digest()
    with pytest.raises(ProtocolError, match="expected a SetupRequest"):
        SetupRequest.from_bytes(adv.to_bytes())
    with pytest.raises(ProtocolError, match="bad magic"):
        decode(b"nonsense")
    with pytest.raises(ProtocolError):
        decode(adv.to_bytes()[:-5])
    blobs: list = []
    d = adv.to_dict(blobs)
    assert KeyAdvertisement.from_dict(d, blobs) == adv
    d["round_id"] = "x"
    with pytest.raises(ProtocolError, match="round_id"):
        KeyAdvertisement.from_dict(d, blobs)
    d = adv.to_dict(blobs)
    d["extra"] = 1
    with pytest.raises(ProtocolError, match="do not match"):
        KeyAdvertisement.from_dict(d, blobs)
    # The header says a blob is a vector of objects: the field's declared type decides, not the header.
    d = msgs[4].to_dict(blobs := [])
    d["vector"]["dtype"] = "|O"
    with pytest.raises(ProtocolError, match="field 'vector' is malformed"):
        MaskedInput.from_dict(d, blobs)


def test_a_deeply_nested_header_is_a_protocol_error_not_a_recursion_error():
    import json
    import struct

    deep = ("[" * 100_000 + "]" * 100_000).encode()
    with pytest.raises(ProtocolError, match="malformed message header"):
        decode(b"FSA2" + struct.pack(">I", len(deep)) + deep)
    nested = json.dumps({"type": "KeysBroadcast", "round_id": 1, "adverts": {"$b": {"$b": {"$b": 0}}}}).encode()
    with pytest.raises(ProtocolError):
        decode(b"FSA2" + struct.pack(">I", len(nested)) + nested)


def test_ring_headroom_and_exact_extremes():
    assert required_ring_bits(10, 8.0, 24) == 32
    assert required_ring_bits(16, 8.0, 24) == 64  # 16 * 2^27 = 2^31 does not fit the signed 32-bit range
    with pytest.raises(SecureAggregationError, match="overflows a 64-bit ring"):
        required_ring_bits(2**21, 8.0, 40)
    # The default precision keeps the ring at 32 bits up to 1000 institutions (the upload = the fp32 adapter);
    # at 1000 it is Flower's step (2^22 levels over [-8, 8] = 2^-18).
    assert [fractional_bits_for(n, 8.0) for n in (3, 10, 16, 40, 100, 1000)] == [26, 24, 23, 22, 21, 18]
    for n in (3, 10, 16, 40, 100, 1000):
        assert required_ring_bits(n, 8.0, fractional_bits_for(n, 8.0)) == 32
    for n, f in ((15, 24), (1000, 18)):
        bits = required_ring_bits(n, 8.0, f)
        for v in (8.0, -8.0):
            q = quantise(np.full(4, v, np.float32), 8.0, f, bits)
            total = np.zeros(4, q.dtype)
            for _ in range(n):
                total += q
            assert np.all(dequantise(total, f) == n * v)
    q = quantise(np.array([0.1, -0.25, 3.0], np.float64), 8.0, 24, 64)
    assert np.array_equal(signed_integers(q), np.rint(np.array([0.1, -0.25, 3.0]) * 2**24).astype(np.int64))


def test_prg_is_deterministic_and_key_dependent():
    a = expand_mask(b"k" * 16, 100_001, np.uint32)
    assert np.array_equal(a, expand_mask(b"k" * 16, 100_001, np.uint32))
    assert not np.array_equal(a[:1000], expand_mask(b"j" * 16, 1000, np.uint32))
    # Chunked streaming gives the same keystream as one call: the prefix of a longer mask equals a shorter one.
    assert np.array_equal(a[:70_000], expand_mask(b"k" * 16, 70_000, np.uint32))


def test_the_reference_path_applies_one_keystream_in_either_chunk_order():
    key, size = b"k" * 16, 3 * 1008 + 7  # chunks of 1008 elements = 63 keystream steps, and a short last one
    want = aegis.keystreams([key], 0, 4 * size)[0].view(np.uint32)
    for reverse in (False, True):
        v, seen = np.zeros(size, np.uint32), []
        MaskApplier(np.uint32, chunk=1008, kernel=None).apply(
            v, [MaskStream(key, np.uint32, +1)], after_chunk=lambda start, chunk: seen.append((start, chunk.size)),
            reverse=reverse)
        assert np.array_equal(v, want)
        chunks = [(0, 1008), (1008, 1008), (2016, 1008), (3024, 7)]
        assert seen == (chunks[::-1] if reverse else chunks)


def test_the_table_in_security_md_is_the_derivation(repo_root):
    text = (repo_root / "SECURITY.md").read_text()
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    ns = [int(v) for v in rows["n"]]
    table = MaskingRequirements().table(ns)
    assert [str(r["degree"]) for r in table] == rows["k"]
    assert [str(r["threshold"]) for r in table] == rows["t"]
    assert [str(r["tolerated_colluders_per_neighbourhood"]) for r in table] == rows["tolerated per neighbourhood (2t − m − 1)"]
