"""Property tests: for random federations, thresholds, sizes and dropout schedules, the unmasked sum is
exactly the sum of the survivors' quantised inputs, and a round that lost too many parties aborts without
releasing anything."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedse_secure.secagg.backends.masking import MaskingBackend
from fedse_secure.secagg.base import RoundAbortedError
from fedse_secure.secagg.driver import InProcessParties, drive
from fedse_secure.secagg.masking import STAGES, IdentityKey, MaskingSettings, ProtocolError, PublicKeyRegistry, decode
from fedse_secure.secagg.encoding import count_out_of_range, max_quantised
from fedse_secure.secagg.masking.prg import CHUNK_ELEMENTS, RandomSource
from fedse_secure.secagg.masking.quantize import quantise, signed_integers

_IDS: dict[str, IdentityKey] = {}


def _identities(names):
    for n in names:
        if n not in _IDS:  # Ed25519 keys are reused across examples; each round still makes fresh X25519 keys
            _IDS[n] = IdentityKey.generate(RandomSource.seeded(hash(n) & 0xFFFF, n))
    return {n: _IDS[n] for n in names}


def _setup(n, size, cfg, seed):
    names = [f"c{i:02d}" for i in range(n)]
    ids = _identities(names)
    reg = PublicKeyRegistry.from_identities(ids)
    rng = np.random.default_rng(seed)
    # Mostly small values, some beyond the clipping range so clipping is exercised too.
    inputs = {p: (rng.standard_normal(size) * rng.choice([0.01, 1.0, 6.0])).astype(np.float32) for p in names}
    backend = MaskingBackend(cfg)
    server = backend.server(seed % 1000, names, size, reg, seed=seed)
    clients = {p: backend.client(p, ids[p], reg, seed=seed) for p in names}
    for p in names:
        clients[p].set_input(inputs[p])
    return server, clients, inputs


def run_round(server, clients, schedule):
    """Every party in this process; a party in ``schedule`` stops answering from its stage on."""
    return drive(server, InProcessParties(clients, stages=STAGES, dropouts=schedule))


def _quantised_sum(inputs, names, server):
    s = server.machine.setup
    total = np.zeros(s.vector_len, dtype=np.int64)
    for p in names:
        total += signed_integers(quantise(inputs[p], s.clip_range, s.fractional_bits, s.ring_bits)).astype(np.int64)
    return total / 2.0**s.fractional_bits


def _alive_sets(names, schedule):
    """U1..U5 from a dropout schedule (a client dropped at stage s answers no request from s on)."""
    out = []
    for i in range(len(STAGES)):
        out.append(frozenset(p for p in names if p not in schedule or STAGES.index(schedule[p]) > i))
    return out


@st.composite
def _full_graph_case(draw, abort: bool):
    n = draw(st.integers(3, 30))
    t = draw(st.integers(n // 2 + 1, n))
    size = draw(st.integers(1, 200))
    lo, hi = (n - t + 1, n) if abort else (0, n - t)
    d = draw(st.integers(lo, hi))
    dropped = draw(st.permutations(range(n)))[:d]
    stages = draw(st.lists(st.sampled_from(STAGES), min_size=d, max_size=d))
    schedule = {f"c{i:02d}": s for i, s in zip(dropped, stages)}
    return n, t, size, schedule, draw(st.integers(0, 2**31))


def _full_graph(n: int, t: int) -> MaskingSettings:
    # The mechanics under any safe (complete graph, t > n/2) setting: no colluders declared, explicit k and t.
    return MaskingSettings(colluder_fraction=0.0, dropout_fraction=0.0, neighbours=max(2, n - 1), threshold=t)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_full_graph_case(abort=False))
def test_sum_is_exact_with_at_most_n_minus_t_dropouts(case):
    n, t, size, schedule, seed = case
    server, clients, inputs = _setup(n, size, _full_graph(n, t), seed)
    res = run_round(server, clients, schedule)
    u3 = _alive_sets(sorted(inputs), schedule)[2]
    assert res.survivors == sorted(u3)
    assert np.array_equal(res.total, _quantised_sum(inputs, u3, server))


@pytest.mark.parametrize("size, fractional_bits", [(CHUNK_ELEMENTS, None), (2 * CHUNK_ELEMENTS + 5, None),
                                                   (CHUNK_ELEMENTS + 3, 40)])
def test_the_sum_released_into_its_own_memory_is_exact_across_chunks(size, fractional_bits):
    """The server releases the float64 result over the ring sum it is made from, last chunk first: every chunk,
    the clipped count in the last slot (alone in its chunk at ``CHUNK_ELEMENTS``) and a 64-bit ring survive it."""
    cfg = MaskingSettings(colluder_fraction=0.0, dropout_fraction=0.0, neighbours=2, threshold=2,
                          fractional_bits=fractional_bits)
    server, clients, inputs = _setup(3, size, cfg, seed=size)
    rng = np.random.default_rng(size)
    for p in inputs:  # some values beyond the clipping range, so there is a count to carry
        inputs[p] = (rng.standard_normal(size) * 4).astype(np.float32)
        clients[p].set_input(inputs[p])
    res = run_round(server, clients, {})
    s = server.machine.setup
    assert s.ring_bits == (64 if fractional_bits else 32)
    assert np.array_equal(res.total, _quantised_sum(inputs, sorted(inputs), server))
    cap = max_quantised(s.clip_range, s.fractional_bits)
    clipped = sum(min(count_out_of_range(x, s.clip_range), cap) for x in inputs.values())
    assert clipped > 0 and res.measurements["values_clipped"] == clipped


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_full_graph_case(abort=True))
def test_more_than_n_minus_t_dropouts_abort_and_release_nothing(case):
    n, t, size, schedule, seed = case
    server, clients, inputs = _setup(n, size, _full_graph(n, t), seed)
    with pytest.raises(RoundAbortedError, match="nothing is released|no institution"):
        run_round(server, clients, schedule)
    assert server.result is None
    # The unmask shares (if any were sent) never exceed what the server may hold: no self-mask seed of a
    # survivor was reconstructed, because the server aborted before its unmask computation.
    assert not server.machine.done


@st.composite
def _graph_case(draw):
    n = draw(st.integers(6, 26))
    k = draw(st.sampled_from([4, 6]).filter(lambda k: k < n - 1))
    # Dropouts alone must never cut the ring: t >= k/2 + 2 (the least any requirements accept).
    t = draw(st.integers(k // 2 + 2, k + 1))
    size = draw(st.integers(1, 64))
    d = draw(st.integers(0, max(1, n // 3)))
    dropped = draw(st.permutations(range(n)))[:d]
    stages = draw(st.lists(st.sampled_from(STAGES), min_size=d, max_size=d))
    return n, k, t, size, {f"c{i:02d}": s for i, s in zip(dropped, stages)}, draw(st.integers(0, 2**31))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_graph_case())
def test_secagg_plus_graph_succeeds_exactly_when_every_neighbourhood_keeps_t_holders(case):
    n, k, t, size, schedule, seed = case
    cfg = MaskingSettings(colluder_fraction=0.0, dropout_fraction=0.0, neighbours=k, threshold=t)
    server, clients, inputs = _setup(n, size, cfg, seed)
    machine = server.machine
    u1, u2, u3, _, u5 = _alive_sets(sorted(inputs), schedule)
    try:
        res = run_round(server, clients, schedule)
    except RoundAbortedError:
        res = None
    if not machine.advertised:  # aborted before the graph was drawn: too few advertised keys
        assert res is None and len(u1) < max(2, t)
        return
    # The graph is drawn over those who advertised keys, after they did.
    assert all(len(v) == min(k, len(u1) - 1) for v in machine.neighbours.values())

    def ok(owners, alive):
        return all(len(machine.holders(o) & alive) >= t for o in owners)

    feasible = ok(u1, u1) and ok(u2, u2) and ok(u2, u5) and bool(u5)
    event("completes" if feasible else "aborts")
    if feasible:
        assert res is not None and np.array_equal(res.total, _quantised_sum(inputs, u3, server))
    else:
        assert res is None and server.result is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512) | st.builds(lambda head, tail: b"FSA2" + head + tail, st.binary(max_size=8),
                                           st.binary(max_size=256)))
def test_decode_raises_only_protocol_error_on_any_bytes(data):
    try:
        decode(data)
    except ProtocolError:
        pass


def _mutations(wire: bytes):
    """Structured garbage: real messages with bytes flipped, cut, or their JSON header values replaced."""
    import json
    import struct

    @st.composite
    def mutate(draw):
        kind = draw(st.sampled_from(["flip", "cut", "header"]))
        if kind == "flip":
            i = draw(st.integers(0, len(wire) - 1))
            return wire[:i] + bytes([wire[i] ^ draw(st.integers(1, 255))]) + wire[i + 1:]
        if kind == "cut":
            return wire[: draw(st.integers(0, len(wire) - 1))]
        (hlen,) = struct.unpack(">I", wire[4:8])
        header = json.loads(wire[8 : 8 + hlen])
        key = draw(st.sampled_from(sorted(header)))
        header[key] = draw(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                                        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                                              max_size=3),
                                        max_leaves=8))
        head = json.dumps(header).encode()
        return wire[:4] + struct.pack(">I", len(head)) + head + wire[8 + hlen:]

    return mutate()


def _sample_wires() -> list[bytes]:
    from fedse_secure.secagg.masking import (
        EncryptedShares,
        KeyAdvertisement,
        KeysBroadcast,
        MaskedInput,
        SetupRequest,
        UnmaskRequest,
    )

    adv = KeyAdvertisement(round_id=3, sender="a", mask_public_key=b"1" * 32, enc_public_key=b"2" * 32,
                           seed_commitment=b"3" * 32, signature=b"4" * 64)
    return [m.to_bytes() for m in (
        SetupRequest(round_id=3, participants=["a", "b", "c"], threshold=3, degree=2, vector_len=5, nonce=b"n" * 32,
                     server_key=b"k" * 32),
        KeysBroadcast(round_id=3, adverts=[adv, adv]),
        EncryptedShares(round_id=3, sender="a", ciphertexts={"b": b"x"}, commitments={"a": b"c" * 64}, signature=b"s"),
        MaskedInput(round_id=3, sender="a", vector=np.arange(5, dtype=np.uint32), tag=b"t" * 16),
        UnmaskRequest(round_id=3, survivors=["a"], signatures={"a": b"s"}),
    )]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(range(5)).flatmap(lambda i: _mutations(_sample_wires()[i])))
def test_decode_of_mutated_messages_raises_only_protocol_error(data):
    try:
        decode(data)
    except ProtocolError:
        pass
