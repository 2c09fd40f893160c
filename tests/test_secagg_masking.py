"""The masking backend end to end (through the in-process driver): exact sums, weights, dropouts, the SecAgg+
graph, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from fedse_secure.secagg.backends import BACKENDS
from fedse_secure.secagg.backends.masking import MaskingBackend
from fedse_secure.secagg.base import AggregateResult, Backend, RoundAbortedError, SecureAggregationError
from fedse_secure.secagg.driver import aggregate
from fedse_secure.secagg.masking import (
    AuthenticationError,
    IdentityKey,
    InvalidUpdateError,
    MaskedInput,
    MaskingSettings,
    ProtocolError,
    PublicKeyRegistry,
    SecAggClient,
    SecAggServer,
    Stage,
    decode,
)
from fedse_secure.secagg.masking.quantize import quantise, required_ring_bits, signed_integers


def _inputs(n: int, size: int, seed: int = 0, scale: float = 0.5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"inst{i:02d}": (rng.standard_normal(size) * scale).astype(np.float32) for i in range(n)}


class _Masking:
    """The masking backend with ``cfg``, one reproducible round at a time."""

    def __init__(self, cfg: MaskingSettings, seed: int | None = None, identities=None):
        self.backend, self.seed, self.identities = MaskingBackend(cfg), seed, identities

    def aggregate(self, round_id, inputs, dropouts=None):
        return aggregate(self.backend, round_id, inputs, identities=self.identities, dropouts=dropouts, seed=self.seed)


def _expected(inputs, names, cfg: MaskingSettings) -> np.ndarray:
    f = cfg.precision(len(inputs))
    bits = required_ring_bits(len(inputs), cfg.clip_range, f)
    total = sum(signed_integers(quantise(inputs[n], cfg.clip_range, f, bits)).astype(np.int64) for n in names)
    return total / 2.0**f


def test_is_a_registered_backend_and_sum_is_exact():
    cfg = MaskingSettings()
    agg = _Masking(cfg, seed=7)
    assert BACKENDS.get("masking") is MaskingBackend and issubclass(MaskingBackend, Backend)
    caps = MaskingBackend.capabilities
    assert caps.cross_machine and caps.tolerates_dropouts and caps.hides_inputs
    inputs = _inputs(6, 1001)
    res = agg.aggregate(1, inputs)
    assert isinstance(res, AggregateResult)
    assert res.survivors == sorted(inputs) and res.dropped == []
    assert np.array_equal(res.total, _expected(inputs, inputs, cfg))
    plain = sum(v.astype(np.float64) for v in inputs.values())
    assert np.max(np.abs(res.total - plain)) <= 6 * 2.0**-25
    m = res.measurements
    assert m["ring_bits"] == 32 and m["fractional_bits"] == 24
    for key in ("bytes_sent_per_client", "values_clipped", "stage_advertise_keys_s", "stage_share_keys_s",
                "stage_masked_input_s", "stage_consistency_s", "stage_unmask_s", "server_s"):
        assert key in m
    assert m["values_clipped"] == 0
    assert m["bytes_sent_per_client"] > 1001 * 4  # the masked vector plus keys, shares and signatures
    assert m["tolerated_colluders"] == 2 * m["threshold"] - m["graph_degree"] - 2


def test_float64_inputs_and_several_rounds_with_given_identities():
    names = ["a", "b", "c", "d"]
    ids = {n: IdentityKey.generate() for n in names}
    cfg = MaskingSettings(fractional_bits=32)
    agg = _Masking(cfg, identities=ids)
    rng = np.random.default_rng(3)
    for rnd in range(3):
        inputs = {n: rng.uniform(-1, 1, 64) for n in names}
        res = agg.aggregate(rnd, inputs)
        assert res.measurements["ring_bits"] == 64
        assert np.array_equal(res.total, _expected(inputs, names, cfg))
    with pytest.raises(SecureAggregationError, match="no identity key for"):
        agg.aggregate(9, {**inputs, "e": inputs["a"]})


def test_weighted_contributions_sum_weights_too():
    rng = np.random.default_rng(4)
    updates = {f"c{i}": rng.normal(0, 0.1, 50) for i in range(5)}
    weights = {"c0": 0.1, "c1": 0.3, "c2": 0.2, "c3": 0.25, "c4": 0.15}
    contrib = {c: np.append(weights[c] * u, weights[c]).astype(np.float32) for c, u in updates.items()}
    res = _Masking(MaskingSettings(), seed=1).aggregate(2, contrib)
    mean = res.total[:-1] / res.total[-1]
    want = sum(weights[c] * updates[c] for c in updates) / sum(weights.values())
    assert np.allclose(mean, want, atol=1e-5)


@pytest.mark.parametrize("stage", [Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.CONSISTENCY,
                                   Stage.UNMASK])
def test_one_dropout_at_each_stage(stage):
    cfg = MaskingSettings()
    inputs = _inputs(7, 300, seed=1)
    res = _Masking(cfg, seed=3).aggregate(5, inputs, dropouts={"inst03": stage})
    in_sum = stage in (Stage.CONSISTENCY, Stage.UNMASK)  # its masked vector had already arrived
    assert ("inst03" in res.survivors) == in_sum
    assert np.array_equal(res.total, _expected(inputs, res.survivors, cfg))


def test_dropouts_at_two_stages_and_a_backend_with_three_institutions_minimum():
    # Two dropouts among 8 need dropout_fraction 0.25 (the default 0.1 plans for none at n = 8).
    cfg = MaskingSettings(dropout_fraction=0.25)
    inputs = _inputs(8, 100)
    res = _Masking(cfg, seed=4).aggregate(1, inputs, dropouts={"inst01": "masked_input", "inst04": "share_keys"})
    assert res.dropped == ["inst01", "inst04"]
    assert np.array_equal(res.total, _expected(inputs, res.survivors, cfg))
    assert MaskingBackend(cfg).settings.parameters(8).degree == 7  # the complete graph, t = 5
    backend = MaskingBackend(MaskingSettings())
    assert backend.min_contributors(8) == 4 and backend.min_contributors(40) == 12  # the derived thresholds
    with pytest.raises(ValueError, match="needs at least 3 institutions"):
        backend.check(2)


def test_secagg_plus_graph_with_dropouts():
    cfg = MaskingSettings()  # n = 40: degree 16, threshold 12 of 17 (Bell et al. for 10% colluders/dropouts)
    inputs = _inputs(40, 200, seed=2)
    drops = {"inst05": Stage.MASKED_INPUT, "inst17": Stage.SHARE_KEYS, "inst30": Stage.UNMASK}
    res = _Masking(cfg, seed=5).aggregate(1, inputs, dropouts=drops)
    assert res.measurements["graph_degree"] == 16 and res.measurements["ring_bits"] == 32
    assert res.dropped == ["inst05", "inst17"]
    assert np.array_equal(res.total, _expected(inputs, res.survivors, cfg))


def test_too_many_dropouts_abort_without_a_sum():
    cfg = MaskingSettings(threshold=4)
    inputs = _inputs(5, 50)
    with pytest.raises(RoundAbortedError, match="nothing is released"):
        _Masking(cfg, seed=6).aggregate(1, inputs, dropouts={"inst00": Stage.MASKED_INPUT, "inst01": Stage.UNMASK})


def test_nan_inf_and_out_of_range_errors():
    inputs = _inputs(4, 100)
    bad = dict(inputs, inst02=inputs["inst02"].copy())
    bad["inst02"][7] = np.nan
    with pytest.raises(InvalidUpdateError, match="inst02's update contains 1 NaN/Inf"):
        _Masking(MaskingSettings(), seed=1).aggregate(1, bad)
    bad["inst02"][7] = np.inf
    with pytest.raises(InvalidUpdateError, match="NaN/Inf"):
        _Masking(MaskingSettings(), seed=1).aggregate(1, bad)
    big = dict(inputs, inst01=inputs["inst01"].copy())
    big["inst01"][[3, 4, 5]] = [9.0, -20.0, 100.0]
    cfg = MaskingSettings(on_out_of_range="clip")
    res = _Masking(cfg, seed=1).aggregate(1, big)
    assert res.measurements["values_clipped"] == 3
    assert np.array_equal(res.total, _expected(big, big, cfg))
    assert res.total[5] == pytest.approx(8.0 + sum(inputs[n][5] for n in inputs if n != "inst01"), abs=1e-5)
    with pytest.raises(InvalidUpdateError, match="outside \\[-8.0, 8.0\\].*on_out_of_range: clip"):
        _Masking(MaskingSettings(on_out_of_range="refuse"), seed=1).aggregate(1, big)


def test_shape_errors_and_too_few_institutions():
    with pytest.raises(InvalidUpdateError, match="c: the update has 9 values but the round aggregates 10"):
        _Masking(MaskingSettings()).aggregate(1, {"a": np.zeros(10), "b": np.zeros(10), "c": np.zeros(9)})
    with pytest.raises(SecureAggregationError, match="at least 3 institutions"):
        _Masking(MaskingSettings()).aggregate(1, {"a": np.zeros(3), "b": np.zeros(3)})
    # A configured threshold may raise the derived one, never lower it (caught when the config is validated).
    with pytest.raises(ValueError, match="threshold=2 is below 4, the least that is safe for 5 institutions"):
        MaskingBackend(MaskingSettings(threshold=2)).check(5)
    MaskingBackend(MaskingSettings(threshold=3, colluder_fraction=0.0)).check(5)
    with pytest.raises(ValueError, match="threshold=2 is below 3.*; raise it or leave it unset$"):
        MaskingBackend(MaskingSettings(threshold=2, colluder_fraction=0.0)).check(5)
    with pytest.raises(ValueError, match="neighbours=4 is below 16"):
        MaskingBackend(MaskingSettings(neighbours=4)).check(40)
    with pytest.raises(SecureAggregationError, match="exceeds the neighbourhood size"):
        _Masking(MaskingSettings(threshold=9)).aggregate(1, _inputs(5, 3))


# -- driving the state machines by hand (as a transport does) ---------------------------------------------
def _parties(n=4, size=20, seed=0, cfg=None):
    cfg = cfg or MaskingSettings()
    names = [f"p{i}" for i in range(n)]
    ids = {p: IdentityKey.generate() for p in names}
    reg = PublicKeyRegistry.from_identities(ids)
    vecs = _inputs(n, size, seed)
    clients = {p: SecAggClient(p, ids[p], reg, cfg, vector=vecs[f"inst{i:02d}"]) for i, p in enumerate(names)}
    server = SecAggServer(11, names, size, cfg, reg)
    return server, clients, ids


def _run_stage(server, clients, requests, skip=()):
    replies = {p: clients[p].handle(decode(r.to_bytes())) for p, r in requests.items() if p not in skip}
    for rep in replies.values():
        server.receive(decode(rep.to_bytes()))
    return replies


def test_server_rejects_other_round_duplicates_strangers_and_late_replies():
    server, clients, ids = _parties()
    reqs = server.start()
    replies = {p: clients[p].handle(r) for p, r in reqs.items()}
    stale = decode(replies["p0"].to_bytes())
    stale.round_id = 10
    with pytest.raises(ProtocolError, match="for round 10"):
        server.receive(stale)
    server.receive(replies["p0"])
    with pytest.raises(ProtocolError, match="duplicate advertise_keys reply from 'p0'"):
        server.receive(replies["p0"])
    forged = decode(replies["p1"].to_bytes())
    forged.mask_public_key = bytes(32)
    with pytest.raises(AuthenticationError, match="signature of 'p1' does not verify"):
        server.receive(forged)
    stranger = decode(replies["p1"].to_bytes())
    stranger.sender = "mallory"
    with pytest.raises(ProtocolError, match="'mallory' is not a participant"):
        server.receive(stranger)
    for p in ("p1", "p2", "p3"):
        server.receive(replies[p])
    reqs = server.advance()
    _run_stage(server, clients, reqs)
    reqs = server.advance()
    # p3 is slow: the stage closes without it, so it has dropped and its late vector must not enter the sum.
    _run_stage(server, clients, reqs, skip=("p3",))
    late = clients["p3"].handle(reqs["p3"])
    reqs = server.advance()
    with pytest.raises(ProtocolError, match="arrived during the consistency stage"):
        server.receive(late)
    with pytest.raises(ProtocolError, match="'p3' has dropped out"):
        server.receive(_sig_from(clients, "p0", reqs, "p3"))


def _sig_from(clients, signer, reqs, pretend):
    sig = clients[signer].handle(reqs[signer])
    sig.sender = pretend
    return sig


def test_client_rejects_wrong_round_and_out_of_order_messages():
    server, clients, _ = _parties()
    reqs = server.start()
    c = clients["p0"]
    with pytest.raises(ProtocolError, match="expecting the advertise_keys request"):
        c.handle(MaskedInput(round_id=11, sender="x"))
    _run_stage(server, clients, reqs)
    reqs = server.advance()
    wrong = decode(reqs["p0"].to_bytes())
    wrong.round_id = 12
    with pytest.raises(ProtocolError, match="round 12 during round 11"):
        c.handle(wrong)
    # A stray message is rejected without harming the round: the genuine request is still served.
    assert c.handle(reqs["p0"]).sender == "p0"
    with pytest.raises(ProtocolError, match="expecting the masked_input request"):
        c.handle(reqs["p0"])
