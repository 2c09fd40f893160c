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
from fedse_secure.secagg.masking import IdentityKey, MaskingSettings, PublicKeyRegistry, Stage
from fedse_secure.secagg.masking.prg import RandomSource
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
    return drive(server, InProcessParties(clients, stages=Stage.ALL, dropouts=schedule))


def _quantised_sum(inputs, names, server):
    s = server.machine.setup
    total = np.zeros(s.vector_len, dtype=np.int64)
    for p in names:
        total += signed_integers(quantise(inputs[p], s.clip_range, s.fractional_bits, s.ring_bits)).astype(np.int64)
    return total / 2.0**s.fractional_bits


def _alive_sets(names, schedule):
    """U1..U5 from a dropout schedule (a client dropped at stage s answers no request from s on)."""
    out = []
    for i in range(len(Stage.ALL)):
        out.append(frozenset(p for p in names if p not in schedule or Stage.ALL.index(schedule[p]) > i))
    return out


@st.composite
def _full_graph_case(draw, abort: bool):
    n = draw(st.integers(3, 30))
    t = draw(st.integers(n // 2 + 1, n))
    size = draw(st.integers(1, 200))
    lo, hi = (n - t + 1, n) if abort else (0, n - t)
    d = draw(st.integers(lo, hi))
    dropped = draw(st.permutations(range(n)))[:d]
    stages = draw(st.lists(st.sampled_from(Stage.ALL), min_size=d, max_size=d))
    schedule = {f"c{i:02d}": s for i, s in zip(dropped, stages)}
    return n, t, size, schedule, draw(st.integers(0, 2**31))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_full_graph_case(abort=False))
def test_sum_is_exact_with_at_most_n_minus_t_dropouts(case):
    n, t, size, schedule, seed = case
    cfg = MaskingSettings(threshold=t)
    server, clients, inputs = _setup(n, size, cfg, seed)
    res = run_round(server, clients, schedule)
    u3 = _alive_sets(sorted(inputs), schedule)[2]
    assert res.survivors == sorted(u3)
    assert np.array_equal(res.total, _quantised_sum(inputs, u3, server))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_full_graph_case(abort=True))
def test_more_than_n_minus_t_dropouts_abort_and_release_nothing(case):
    n, t, size, schedule, seed = case
    cfg = MaskingSettings(threshold=t)
    server, clients, inputs = _setup(n, size, cfg, seed)
    with pytest.raises(RoundAbortedError, match="nothing is released|no institution"):
        run_round(server, clients, schedule)
    assert server.result is None
    # The unmask shares (if any were sent) never exceed what the server may hold: no self-mask seed of a
    # survivor was reconstructed, because the server aborted before its unmask computation.
    assert not server.machine.done


@st.composite
def _graph_case(draw):
    n = draw(st.integers(6, 26))
    k = draw(st.sampled_from([2, 4, 6]).filter(lambda k: k < n - 1))
    m = k + 1
    t = draw(st.integers(m // 2 + 1, m))
    size = draw(st.integers(1, 64))
    d = draw(st.integers(0, max(1, n // 3)))
    dropped = draw(st.permutations(range(n)))[:d]
    stages = draw(st.lists(st.sampled_from(Stage.ALL), min_size=d, max_size=d))
    return n, k, t, size, {f"c{i:02d}": s for i, s in zip(dropped, stages)}, draw(st.integers(0, 2**31))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_graph_case())
def test_secagg_plus_graph_succeeds_exactly_when_every_neighbourhood_keeps_t_holders(case):
    n, k, t, size, schedule, seed = case
    cfg = MaskingSettings(threshold=t, neighbours=k)
    server, clients, inputs = _setup(n, size, cfg, seed)
    machine = server.machine
    assert all(len(v) == k for v in machine.neighbours.values())
    u1, u2, _, _, u5 = _alive_sets(sorted(inputs), schedule)

    def ok(owners, alive):
        return all(len(machine.holders(o) & alive) >= t for o in owners)

    feasible = ok(u1, u1) and ok(u2, u2) and ok(u2, u5) and bool(u5)
    event("completes" if feasible else "aborts")
    if feasible:
        res = run_round(server, clients, schedule)
        u3 = _alive_sets(sorted(inputs), schedule)[2]
        assert np.array_equal(res.total, _quantised_sum(inputs, u3, server))
    else:
        with pytest.raises(RoundAbortedError):
            run_round(server, clients, schedule)
        assert server.result is None
