"""What a dishonest coordinator (or a network attacker) can try, and why it gets nothing."""

from __future__ import annotations

import numpy as np
import pytest

from fedse_secure.secagg.backends.masking import MaskingBackend
from fedse_secure.secagg.driver import InProcessParties, aggregate, drive_until
from fedse_secure.secagg.masking import (
    STAGES,
    AuthenticationError,
    ConsistencyRequest,
    IdentityKey,
    MaskedInputRequest,
    MaskingSettings,
    PeerMisbehaviourError,
    ProtocolError,
    PublicKeyRegistry,
    RoundAbortedError,
    SecAggServer,
    Stage,
    UnmaskRequest,
    UnmaskShares,
    decode,
)
from fedse_secure.secagg.masking import keys, shamir
from fedse_secure.secagg.masking.prg import MaskApplier, MaskStream, RandomSource
from fedse_secure.secagg.masking.quantize import quantise

NAMES = ["p0", "p1", "p2", "p3", "p4"]  # full graph, default threshold t = 4 (Bell et al. for 10% colluders)


def _inputs(size=64, seed=0):
    rng = np.random.default_rng(seed)
    return {p: rng.normal(0, 0.5, size).astype(np.float32) for p in NAMES}


def _decoded(interceptor):
    """A driver interceptor (bytes) from one on decoded protocol messages."""
    def on_bytes(stage, direction, name, data):
        msg = interceptor(stage, direction, name, decode(data))
        return None if msg is None else msg.to_bytes()

    return on_bytes


class _Masking:
    """Five institutions with fixed identities (reused across rounds, as in a deployment) and the masking backend."""

    def __init__(self, seed: int):
        root = RandomSource.seeded(seed, "identities")
        self.ids = {p: IdentityKey.generate(root.child(p)) for p in NAMES}
        self.seed = seed

    def aggregate(self, round_id, inputs, interceptor=None):
        return aggregate(MaskingBackend(), round_id, inputs, identities=self.ids, seed=self.seed,
                         interceptor=_decoded(interceptor) if interceptor else None)


def _machines(seed, size):
    backend = MaskingBackend()
    root = RandomSource.seeded(seed)
    ids = {p: IdentityKey.generate(root.child(p)) for p in NAMES}
    reg = PublicKeyRegistry.from_identities(ids)
    xs = _inputs(size, seed)
    server = backend.server(1, NAMES, size, reg, seed=seed)
    clients = {p: backend.client(p, ids[p], reg, seed=seed) for p in NAMES}
    for p in NAMES:
        clients[p].set_input(xs[p])
    return backend, server, clients, xs, ids


def _to_masked_inputs(seed=0, size=64):
    """An honest run of the first three stages; returns everything a (curious) server would hold."""
    backend, server, clients, xs, ids = _machines(seed, size)
    masked = {}

    def keep_masked(stage, direction, name, msg):
        if stage == Stage.MASKED_INPUT and direction == "to_server":
            masked[name] = msg.vector.copy()

    drive_until(server, InProcessParties(clients, stages=backend.stages, interceptor=_decoded(keep_masked)),
                Stage.CONSISTENCY)
    assert server.stage == Stage.CONSISTENCY
    return server.machine, {p: c.machine for p, c in clients.items()}, xs, masked, ids


def test_drive_until_hands_over_at_the_named_stage():
    from fedse_secure.secagg.base import SecureAggregationError

    backend, server, clients, _xs, _ids = _machines(7, 16)
    seen = []

    def observe(stage, direction, name, msg):
        if direction == "to_server":
            seen.append(stage)

    reqs = drive_until(server, InProcessParties(clients, stages=backend.stages, interceptor=_decoded(observe)),
                       Stage.MASKED_INPUT)
    assert server.stage == Stage.MASKED_INPUT and sorted(reqs) == NAMES
    assert seen == [STAGES[0]] * 5 + [STAGES[1]] * 5  # two honest stages, every reply observed
    backend, server, clients, _xs, _ids = _machines(8, 16)
    with pytest.raises(SecureAggregationError, match="ended before stage 'nonsense'"):
        drive_until(server, InProcessParties(clients, stages=backend.stages), "nonsense")


def test_an_alive_client_refuses_to_be_listed_as_dropped():
    server, clients, *_ = _to_masked_inputs()
    lie = ConsistencyRequest(round_id=1, survivors=["p0", "p1", "p3", "p4"])
    with pytest.raises(PeerMisbehaviourError, match="lists this institution as dropped although it sent its masked"):
        clients["p2"].handle(lie)
    assert clients["p2"].aborted


def test_claiming_an_alive_client_dropped_yields_its_mask_key_but_never_its_seed():
    """The server has y_p2 and tells everyone else that p2 dropped. It gets shares of p2's mask key, so it can
    strip p2's pairwise masks, but no honest client ever releases a share of p2's self-mask seed as well, so
    y_p2 stays masked; asking again for the seed shares is refused."""
    server, clients, xs, masked, _ = _to_masked_inputs()
    liars_list = ["p0", "p1", "p3", "p4"]
    sigs = {p: clients[p].handle(ConsistencyRequest(round_id=1, survivors=liars_list)).signature for p in liars_list}
    replies = {p: clients[p].handle(UnmaskRequest(round_id=1, survivors=liars_list, signatures=sigs))
               for p in liars_list}
    assert all("p2" in r.key_shares and "p2" not in r.seed_shares for r in replies.values())
    # What the server can do with that: reconstruct p2's mask key and remove every pairwise mask from y_p2.
    sk = keys.X25519PrivateKey.from_private_bytes(
        shamir.combine([r.key_shares["p2"] for r in replies.values()], server.threshold))
    y = masked["p2"].copy()
    streams = []
    for v in NAMES:
        if v != "p2":
            k = keys.pair_mask_key(sk, server.adverts[v].mask_public_key, server.session, "p2", v)
            streams.append(MaskStream(k, y.dtype, -1 if "p2" < v else +1))
    MaskApplier(y.dtype).apply(y, streams)
    q = quantise(xs["p2"], 8.0, server.setup.fractional_bits, server.setup.ring_bits)
    # Still hidden by the self mask: no element equals the quantised input beyond chance.
    assert np.count_nonzero(y[:-1] == q) <= 1
    # A second request for the seed shares, with p2 now "alive", is refused by every client.
    for p in liars_list:
        with pytest.raises(ProtocolError, match="unmasks once per round"):
            clients[p].handle(UnmaskRequest(round_id=1, survivors=NAMES, signatures=sigs))


def test_equivocating_survivor_lists_are_refused():
    server, clients, *_ = _to_masked_inputs()
    list_a, list_b = NAMES, ["p0", "p1", "p3", "p4"]
    sig_a = {p: clients[p].handle(ConsistencyRequest(round_id=1, survivors=list_a)).signature for p in ("p0", "p1", "p2")}
    sig_b = {p: clients[p].handle(ConsistencyRequest(round_id=1, survivors=list_b)).signature for p in ("p3", "p4")}
    # To p3 (who signed list B): signatures of list A relabelled as list B do not verify.
    with pytest.raises(PeerMisbehaviourError, match="does not verify"):
        clients["p3"].handle(UnmaskRequest(round_id=1, survivors=list_b, signatures={**sig_b, "p0": sig_a["p0"],
                                                                                     "p1": sig_a["p1"]}))
    # To p4: only the two genuine list-B signatures, below t = 4.
    with pytest.raises(PeerMisbehaviourError, match="only 2 of its neighbourhood signed"):
        clients["p4"].handle(UnmaskRequest(round_id=1, survivors=list_b, signatures=sig_b))
    # To p0 (who signed list A): list B is not what it signed.
    with pytest.raises(PeerMisbehaviourError, match="differs from the one this institution signed"):
        clients["p0"].handle(UnmaskRequest(round_id=1, survivors=list_b, signatures=sig_b))
    # A fresh round: p2 is alive and signs the full list; the server shows p3 a list that drops p2 together
    # with p2's own signature (to reach t). p3 sees a live client listed as dropped and refuses.
    server, clients, *_ = _to_masked_inputs(seed=1)
    s2 = clients["p2"].handle(ConsistencyRequest(round_id=1, survivors=list_a)).signature
    sb = {p: clients[p].handle(ConsistencyRequest(round_id=1, survivors=list_b)).signature for p in list_b}
    with pytest.raises(PeerMisbehaviourError, match="'p2' signed the survivor list but is listed as dropped"):
        clients["p3"].handle(UnmaskRequest(round_id=1, survivors=list_b, signatures={**sb, "p2": s2}))


def test_tampered_share_is_rejected():
    def tamper(stage, direction, name, msg):
        if stage == Stage.MASKED_INPUT and direction == "to_client" and name == "p1":
            ct = dict(msg.ciphertexts)
            c = bytearray(ct["p0"])
            c[20] ^= 1
            ct["p0"] = bytes(c)
            return MaskedInputRequest(round_id=msg.round_id, ciphertexts=ct)
        return None

    with pytest.raises(PeerMisbehaviourError, match="shares from 'p0' fail AES-GCM authentication"):
        _Masking(1).aggregate(1, _inputs(), interceptor=tamper)


def test_replayed_and_misdirected_shares_are_rejected():
    captured = {}

    def capture(stage, direction, name, msg):
        if stage == Stage.SHARE_KEYS and direction == "to_server":
            captured[name] = dict(msg.ciphertexts)
        return None

    agg = _Masking(2)
    agg.aggregate(1, _inputs(), interceptor=capture)
    old = captured["p0"]["p1"]

    def replay(stage, direction, name, msg):  # round 2: p1 gets p0's round-1 share again
        if stage == Stage.MASKED_INPUT and direction == "to_client" and name == "p1":
            return MaskedInputRequest(round_id=msg.round_id, ciphertexts={**msg.ciphertexts, "p0": old})
        return None

    with pytest.raises(PeerMisbehaviourError, match="replayed from another round"):
        agg.aggregate(2, _inputs(seed=1), interceptor=replay)

    def misdirect(stage, direction, name, msg):  # p2 gets the share p0 sent to p1
        if stage == Stage.SHARE_KEYS and direction == "to_server" and name == "p0":
            msg.ciphertexts = {**msg.ciphertexts, "p2": msg.ciphertexts["p1"]}
            return msg
        return None

    with pytest.raises(PeerMisbehaviourError, match="shares from 'p0' fail AES-GCM"):
        agg.aggregate(3, _inputs(seed=2), interceptor=misdirect)


def test_server_swapping_keys_is_caught():
    def swap(stage, direction, name, msg):
        if stage == Stage.SHARE_KEYS and direction == "to_client" and name == "p3":
            adv = [decode(a.to_bytes()) for a in msg.adverts]
            evil = keys.new_x25519(RandomSource())
            adv[1].enc_public_key = keys.x25519_public_bytes(evil)  # a man in the middle for p3 <-> p1
            msg = decode(msg.to_bytes())
            msg.adverts = adv
            return msg
        return None

    with pytest.raises(PeerMisbehaviourError, match="signature of 'p1' does not verify"):
        _Masking(3).aggregate(1, _inputs(), interceptor=swap)


@pytest.mark.parametrize("bad", [("p0",), ("p0", "p3")])
def test_tampered_unmask_shares_are_caught_by_the_commitments(bad):
    """Corrupted shares never yield a wrong sum: the server checks every reconstruction against the owner's
    signed commitment (seed) or public key (mask key), and each share against its dealer's signed share
    commitment. With one bad holder out of 5 (t = 4) the 4 good shares reconstruct; with two, no 4 good shares
    remain and the round is abandoned, naming the bad holders."""

    def tamper(stage, direction, name, msg):
        if stage == Stage.UNMASK and direction == "to_server" and name in bad:
            seed = {k: v[:-1] + bytes([v[-1] ^ 1]) for k, v in msg.seed_shares.items()}
            return UnmaskShares(round_id=msg.round_id, sender=name, seed_shares=seed, key_shares=msg.key_shares)
        return None

    xs = _inputs()
    agg = _Masking(4)
    if len(bad) == 1:
        res = agg.aggregate(1, xs, interceptor=tamper)
        f = res.measurements["fractional_bits"]
        want = sum(quantise(xs[p], 8.0, f, 32).view(np.int32).astype(np.int64) for p in NAMES) / 2.0**f
        assert np.array_equal(res.total, want) and res.measurements["shares_rejected"] == 5
    else:
        with pytest.raises(RoundAbortedError, match="match its signed commitments \\(corrupted by p0, p3\\)"):
            agg.aggregate(1, xs, interceptor=tamper)


def _chi2_uniform(values: np.ndarray, bins: int = 256) -> float:
    counts = np.bincount(values, minlength=bins).astype(np.float64)
    expected = values.size / bins
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("kind", ["zeros", "ramp"])
def test_a_masked_vector_is_indistinguishable_from_uniform(kind):
    n_el = 1 << 18
    xs = {p: np.zeros(n_el, np.float32) if kind == "zeros" else np.linspace(-8, 8, n_el, dtype=np.float32)
          for p in ("a", "b", "c")}
    seen = {}

    def grab(stage, direction, name, msg):
        if stage == Stage.MASKED_INPUT and direction == "to_server" and name == "a":
            seen["y"] = msg.vector.copy()
        return None

    aggregate(MaskingBackend(), 1, xs, seed=5, interceptor=_decoded(grab))
    y = seen["y"][:-1].astype(np.uint64)
    # 255 degrees of freedom: mean 255, sd 22.6; 400 is > 6 sd, so a fixed seed cannot flake.
    for byte in range(4):
        assert _chi2_uniform(((y >> (8 * byte)) & 0xFF).astype(np.int64)) < 400
    # No linear trace of the input either.
    if kind == "ramp":
        assert abs(np.corrcoef(y.astype(np.float64), xs["a"])[0, 1]) < 0.02
    # Adjacent elements are independent (a weak PRG would show structure here).
    pairs = ((y[:-1:2] >> 28) * 16 + (y[1::2] >> 28)).astype(np.int64)
    assert _chi2_uniform(pairs) < 400


def test_duplicate_or_replayed_key_advertisements_are_refused():
    def duplicate(stage, direction, name, msg):
        if stage == Stage.SHARE_KEYS and direction == "to_client" and name == "p0":
            msg = decode(msg.to_bytes())
            msg.adverts = msg.adverts + [msg.adverts[1]]
            return msg
        return None

    with pytest.raises(PeerMisbehaviourError, match="duplicate key advertisement from 'p1'"):
        _Masking(6).aggregate(1, _inputs(), interceptor=duplicate)

    captured = {}

    def capture(stage, direction, name, msg):
        if stage == Stage.SHARE_KEYS and direction == "to_client" and name == "p0":
            captured["adverts"] = msg.adverts
        return None

    agg = _Masking(7)
    agg.aggregate(1, _inputs(), interceptor=capture)

    def replay(stage, direction, name, msg):  # round 2: p1's round-1 keys (whose secrets the server may know)
        if stage == Stage.SHARE_KEYS and direction == "to_client" and name == "p0":
            msg = decode(msg.to_bytes())
            msg.adverts = [captured["adverts"][1] if a.sender == "p1" else a for a in msg.adverts]
            return msg
        return None

    with pytest.raises(PeerMisbehaviourError, match="key advertisement of 'p1' is for round 1; replay rejected"):
        agg.aggregate(2, _inputs(), interceptor=replay)


def test_unregistered_institution_cannot_join():
    ids = {p: IdentityKey.generate() for p in NAMES[:4]}
    reg = PublicKeyRegistry.from_identities(ids)
    with pytest.raises(AuthenticationError, match="no identity key in the registry"):
        SecAggServer(1, NAMES, 8, MaskingSettings(), reg)
