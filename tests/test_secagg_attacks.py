"""The attacks of issue 14 on the masking backend, each run with the library's own machines: a coordinator that
lies (split survivor lists, weak setups, a graph of its choosing, partial sums of the ring), institutions that
collude or cheat (tampered or replayed masked inputs, out-of-range values, corrupted shares), and the smaller
holes (a value of an update in an error text, a deeply nested header, a low-order key, a replayed setup).

Every attack here worked against commit 4aa2a94; each test asserts that it fails now, and where a bound is
stated, a negative control shows the attack succeeding just past it.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedse_secure.secagg.backends.masking import MaskingBackend
from fedse_secure.secagg.base import RoundAbortedError, SecureAggregationError
from fedse_secure.secagg.driver import InProcessParties, aggregate, drive, drive_until
from fedse_secure.secagg.masking import (
    STAGES,
    AuthenticationError,
    IdentityKey,
    KeyAdvertisement,
    KeysBroadcast,
    MaskedInput,
    MaskingRequirements,
    MaskingSettings,
    PeerMisbehaviourError,
    ProtocolError,
    PublicKeyRegistry,
    SecAggClient,
    SecAggServer,
    SetupRequest,
    Stage,
    UnsafeSetupError,
    decode,
    keys,
    shamir,
)
from fedse_secure.secagg.masking.graph import graph_seed, neighbour_sets
from fedse_secure.secagg.masking.messages import masked_input_header
from fedse_secure.secagg.masking.prg import InputTag, RandomSource
from fedse_secure.secagg.masking.quantize import dequantise, quantise, signed_integers
from fedse_threat_model.attacks import cut_the_ring, exposure_rate, split_survivor_lists, strip_pair_masks, strip_self_mask


def _names(n: int) -> list[str]:
    return [f"p{i:02d}" for i in range(n)]


def _inputs(names, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p: rng.normal(0, 0.5, size).astype(np.float32) for p in names}


class _Federation:
    """Institutions with fixed identities; a server machine from ``server_backend`` and client machines from
    ``client_backend`` (by default one backend for both, as in ``fedse simulate``)."""

    def __init__(self, names, seed: int = 0, client_backend=None, server_backend=None):
        self.names = sorted(names)
        root = RandomSource.seeded(seed, "attack-identities")
        self.ids = {p: IdentityKey.generate(root.child(p)) for p in self.names}
        self.registry = PublicKeyRegistry.from_identities(self.ids)
        self.clients_backend = client_backend or MaskingBackend()
        self.server_backend = server_backend or self.clients_backend
        self.seed = seed

    def machines(self, round_id: int, xs):
        size = next(iter(xs.values())).size
        server = self.server_backend.server(round_id, self.names, size, self.registry, seed=self.seed)
        clients = {p: self.clients_backend.client(p, self.ids[p], self.registry, seed=self.seed) for p in self.names}
        for p in self.names:
            clients[p].set_input(xs[p])
        return server, clients

    def to_consistency(self, xs, round_id: int = 1):
        """An honest run of the first three stages: the server and client machines, and the masked vectors."""
        server, clients = self.machines(round_id, xs)
        masked = {}

        def keep(stage, direction, name, data):
            if stage == Stage.MASKED_INPUT and direction == "to_server":
                masked[name] = decode(data).vector.copy()
            return None

        drive_until(server, InProcessParties(clients, stages=STAGES, interceptor=keep), Stage.CONSISTENCY)
        return server.machine, {p: c.machine for p, c in clients.items()}, masked


def _quantised_sum(xs, names, server) -> np.ndarray:
    s = server.setup
    total = sum(signed_integers(quantise(xs[p], s.clip_range, s.fractional_bits, s.ring_bits)).astype(np.int64)
                for p in names)
    return total / 2.0**s.fractional_bits


# ======================================================================================================
# 1. Split survivor lists: "victim alive" to some holders, "victim dropped" to others; colluders sign both
# ======================================================================================================

@pytest.mark.parametrize("past_the_bound", [False, True])
def test_split_survivor_lists_fail_within_the_stated_collusion_bound_and_succeed_one_past_it(past_the_bound):
    """n = 5, the defaults: complete graph, t = 4, m = 5. The stated tolerance against a lying coordinator is
    2t - m - 1 = 2 colluders (4aa2a94 claimed t - 1 = 3, and 3 recovered the victim exactly)."""
    names = _names(5)
    params = MaskingSettings().parameters(5)
    assert (params.degree, params.threshold, params.tolerated_colluders) == (4, 4, 2)
    victim = "p02"
    colluders = [p for p in names if p != victim][: params.tolerated_colluders + int(past_the_bound)]
    xs = _inputs(names, 512)
    server, clients, masked = _Federation(names).to_consistency(xs)
    seeds, mask_keys = split_survivor_lists(server, clients, victim, colluders)
    t = server.threshold
    if not past_the_bound:
        assert len(seeds) < t or len(mask_keys) < t, "both secrets of the victim were released"
        return
    # Negative control: one colluder more than the bound and the victim's update is recovered exactly.
    seed = shamir.combine(seeds, t)
    sk = keys.X25519PrivateKey.from_private_bytes(shamir.combine(mask_keys, t))
    y = strip_pair_masks(masked[victim], victim, sk, server, server.neighbours[victim] & server.shared)
    y = strip_self_mask(y, seed, server.session)
    q = quantise(xs[victim], 8.0, server.setup.fractional_bits, server.setup.ring_bits)
    assert np.array_equal(y[:-1], q)


# ======================================================================================================
# 2. Institutions accepted whatever degree, threshold, participants and graph the coordinator picked
# ======================================================================================================

def _weakened(names, size: int, **changes) -> tuple[SetupRequest, dict[str, SecAggClient]]:
    fed = _Federation(names)
    server, clients = fed.machines(1, _inputs(names, size))
    setup = decode(server.start()[names[0]])
    for field, value in changes.items():
        setattr(setup, field, value)
    return setup, {p: c.machine for p, c in clients.items()}


@pytest.mark.parametrize(("n", "changes", "message"), [
    (5, {"threshold": 3}, "threshold: 3 is below 4"),
    (12, {"degree": 4, "threshold": 3}, "degree: 4 is below 8"),
    (40, {"degree": 2, "threshold": 2}, "degree: 2 is below 16"),
    (40, {"degree": 16, "threshold": 9}, "threshold: 9 is below 12"),
    (3, {"participants": ["p00", "p01"], "degree": 1, "threshold": 2}, "participants: the setup lists 2"),
])
def test_an_institution_refuses_a_setup_weaker_than_its_own_requirements(n, changes, message):
    setup, clients = _weakened(_names(n), 16, **changes)
    client = clients["p00"]
    with pytest.raises(UnsafeSetupError, match=f"p00 refuses the setup of round 1: {message}") as err:
        client.handle(setup)
    assert len(str(err.value).splitlines()) == 1 and client.aborted
    # The abort is sticky: whatever comes next gets no answer.
    with pytest.raises(RoundAbortedError, match="was aborted"):
        client.handle(setup)


def test_an_institution_never_takes_its_requirements_from_the_coordinator():
    """The coordinator is configured weak (no colluders assumed, t = 3 of 5); the institutions keep their own
    requirements (the defaults): the round is refused with one line naming the parameter, in process."""
    names = _names(5)
    weak = MaskingBackend(MaskingSettings(colluder_fraction=0.0, threshold=3))
    fed = _Federation(names, client_backend=MaskingBackend(), server_backend=weak)
    server, clients = fed.machines(1, _inputs(names, 8))
    assert server.machine.setup.threshold == 3
    with pytest.raises(UnsafeSetupError, match=r"^p00 refuses the setup of round 1: threshold: 3 is below 4"):
        drive(server, InProcessParties(clients, stages=STAGES))
    # An institution that itself assumes no colluders accepts the same setup.
    lenient = MaskingBackend(requirements=MaskingRequirements(colluder_fraction=0.0))
    fed = _Federation(names, client_backend=lenient, server_backend=weak)
    server, clients = fed.machines(2, xs := _inputs(names, 8))
    res = drive(server, InProcessParties(clients, stages=STAGES))
    assert np.array_equal(res.total, _quantised_sum(xs, names, server.machine))


def test_a_coordinator_cannot_gather_the_colluders_into_a_small_round():
    """Twenty institutions approved the experiment; two of them (10%, within the assumed fraction) collude with the
    coordinator, which lists only them and one victim in a round. Counted among the three listed, one colluder is
    assumed and t = 3 looks safe, and the sum minus the colluders' inputs is the victim's update. Counted among the
    twenty approved, both may be listed: no threshold leaves two honest inputs, and the victim refuses."""
    approved, listed = _names(20), ["p00", "p01", "p02"]
    xs = _inputs(listed, 16)
    unbound = _Federation(listed, client_backend=MaskingBackend(requirements=MaskingRequirements()),
                          server_backend=MaskingBackend())
    server, clients = unbound.machines(1, xs)
    res = drive(server, InProcessParties(clients, stages=STAGES))
    exposed = res.total - _quantised_sum(xs, ["p01", "p02"], server.machine)
    assert np.array_equal(exposed, _quantised_sum(xs, ["p00"], server.machine)), "the attack must work unbound"

    bound = MaskingBackend(requirements=MaskingRequirements().for_roster(approved))
    server, clients = _Federation(listed, client_backend=bound, server_backend=MaskingBackend()).machines(2, xs)
    with pytest.raises(UnsafeSetupError, match=r"^p00 refuses the setup of round 2: participants: a sum of 3 listed "
                                               r"institutions cannot hold two honest inputs beside the 2 colluders"):
        drive(server, InProcessParties(clients, stages=STAGES))
    # Within the roster a smaller round stays possible when it keeps two honest inputs: 5 approved, 3 listed.
    small = MaskingBackend(requirements=MaskingRequirements().for_roster(_names(5)))
    server, clients = _Federation(listed, client_backend=small, server_backend=MaskingBackend()).machines(3, xs)
    assert np.array_equal(drive(server, InProcessParties(clients, stages=STAGES)).total,
                          _quantised_sum(xs, listed, server.machine))


def test_a_setup_may_list_only_the_approved_experiments_institutions():
    names = _names(4)
    bound = MaskingBackend(requirements=MaskingRequirements().for_roster(names[:3]))
    fed = _Federation(names, client_backend=bound, server_backend=MaskingBackend())
    server, clients = fed.machines(1, _inputs(names, 8))
    with pytest.raises(UnsafeSetupError, match=r"participants: \['p03'\] are not institutions of the experiment"):
        drive(server, InProcessParties(clients, stages=STAGES))


def test_the_graph_is_drawn_from_every_signed_advertisement_not_chosen_by_the_coordinator():
    """The setup carries no graph seed. The same setup answered by the same institutions with fresh keys gives
    another graph, so the coordinator cannot evaluate (let alone grind) a graph before every key is in. A
    roster with a forged advertisement is refused; an institution shown a roster without one advertiser
    cannot take part in the round, which completes without it."""
    from fedse_secure.secagg.masking.graph import roster_digest

    names = _names(12)
    assert "graph_seed" not in SetupRequest.__dataclass_fields__
    fed = _Federation(names)
    setup = fed.machines(1, _inputs(names, 8))[0].machine.setup
    graphs = []
    for seed in (1, 2):  # the same setup, answered by the same institutions with fresh round keys
        backend = MaskingBackend()
        adverts = [backend.client(p, fed.ids[p], fed.registry, seed=seed).machine.handle(setup) for p in names]
        graphs.append(neighbour_sets(names, setup.degree, graph_seed(roster_digest(setup.digest(), adverts))))
    assert graphs[0] != graphs[1]

    # A forged advertisement in the roster: every institution refuses before sending a share.
    fed = _Federation(names)
    server, clients = fed.machines(1, _inputs(names, 8))
    reqs = drive_until(server, InProcessParties(clients, stages=STAGES), Stage.SHARE_KEYS)
    roster = decode(reqs["p00"])
    roster.adverts[3].enc_public_key = bytes(range(32))
    with pytest.raises(PeerMisbehaviourError, match="signature of 'p03' does not verify"):
        clients["p00"].machine.handle(roster)

    # p05 is shown a roster without p07: another session, so nothing it sends fits the round.
    xs = _inputs(names, 64)

    def leave_out(stage, direction, name, data):
        if stage == Stage.SHARE_KEYS and direction == "to_client" and name == "p05":
            msg = decode(data)
            msg.adverts = [a for a in msg.adverts if a.sender != "p07"]
            return msg.to_bytes()
        return None

    server, clients = fed.machines(2, xs)
    res = drive(server, InProcessParties(clients, stages=STAGES, interceptor=leave_out))
    assert "p05" not in res.survivors and np.array_equal(res.total, _quantised_sum(xs, res.survivors, server.machine))


class _PushingOnServer(SecAggServer):
    """A coordinator that never gives up on its own (it skips its live-holder checks)."""

    def _require(self, owners, alive, stage):
        return None


class _WeakServer(_PushingOnServer):
    """... and proposes t = k/2 + 1, the least 4aa2a94 accepted (more than half of a neighbourhood)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.setup.threshold = self.threshold = self.setup.degree // 2 + 1
        self.digest = self.setup.digest()


class _Lenient(MaskingRequirements):
    """An institution that accepts any setup (the checks of 4aa2a94, for the negative control)."""

    def refusal(self, *args, **kwargs):
        return None


@pytest.mark.parametrize("weak", [False, True], ids=["derived_threshold", "negative_control_t_k_over_2_plus_1"])
def test_dropping_two_arcs_of_the_ring_never_releases_their_partial_sums(weak):
    """n = 40 (k = 16, t = 12). The coordinator silences k/2 consecutive institutions at two places of the ring
    once the graph is known, which leaves two arcs whose sums it could unmask separately. The institutions next
    to a gap see only k/2 + 1 < t live holders and refuse, the refusals cascade and nothing is released. With
    t = k/2 + 1 (the negative control) the round completes and each arc's sum comes out exactly."""
    names = _names(40)
    server_class = _WeakServer if weak else _PushingOnServer
    clients_backend = MaskingBackend(requirements=_Lenient()) if weak else MaskingBackend()
    fed = _Federation(names, server_backend=MaskingBackend(server_class=server_class), client_backend=clients_backend)
    xs = _inputs(names, 32)
    server, clients = fed.machines(1, xs)
    cut = cut_the_ring(server, clients)
    if not weak:
        assert isinstance(cut.error, SecureAggregationError)
        assert server.machine.result is None
        return
    m = server.machine
    assert sorted(cut.result.survivors) == sorted(cut.arcs[0] + cut.arcs[1])
    for arc, y in zip(cut.arcs, cut.arc_sums):  # pairwise masks cancel inside the arc; self masks stripped
        assert np.array_equal(dequantise(y[:-1], m.setup.fractional_bits), _quantised_sum(xs, arc, m))


# ======================================================================================================
# 3. Graph parameters follow the declared colluder and dropout fractions
# ======================================================================================================

def test_default_parameters_keep_a_tenth_of_colluders_from_exposing_anyone_at_n_1000():
    n, c = 1000, 100
    p = MaskingSettings().parameters(n)
    assert (p.degree, p.threshold) == (108, 77)
    assert exposure_rate(n, c, p.degree, p.threshold, trials=300) == 0.0
    # Negative control: 4aa2a94's parameters (degree 2 ceil(log2 n) = 20, t = floor(2m/3) + 1 = 15) are not.
    assert exposure_rate(n, c, 20, 15, trials=300) > 0.5


# ======================================================================================================
# 4. Masked inputs are authenticated and the released sum is bounded
# ======================================================================================================

def test_a_tampered_masked_input_is_rejected_and_leaves_the_sum_as_it_was():
    """200 single-bit flips of one institution's masked input, each fed to the coordinator before the
    genuine one (100 before any input is in the sum, 100 after another institution's): every flip is rejected
    with the machine unchanged, then the genuine vector is accepted and the released sum is exact (4aa2a94
    accepted every flip; errors up to 128 where n x clip = 24)."""
    names = _names(3)
    xs = _inputs(names, 300)
    fed = _Federation(names)
    server, clients = fed.machines(1, xs)
    reqs = drive_until(server, InProcessParties(clients, stages=STAGES), Stage.MASKED_INPUT)
    genuine = {p: clients[p].handle(reqs[p]) for p in names}
    rng = np.random.default_rng(1)
    wire = bytearray(genuine["p01"])
    body = len(wire) - 8 - 16 - 301 * 4  # offset of the vector in the message
    for k in range(200):
        if k == 100:  # the sum is empty for the first 100 flips and holds p00's input for the rest
            server.receive("p00", genuine["p00"])
        flipped = bytearray(wire)
        i = body + int(rng.integers(0, 301 * 4))
        flipped[i] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(AuthenticationError, match="fails its tag"):
            server.receive("p01", bytes(flipped))
    for p in names[1:]:
        server.receive(p, genuine[p])
    parties = InProcessParties(clients, stages=STAGES)
    requests = server.advance()
    while requests:
        for name, reply in parties(server.stage, requests):
            server.receive(name, reply)
        requests = server.advance()
    assert np.array_equal(server.result.total, _quantised_sum(xs, names, server.machine))


def test_a_masked_input_relabelled_from_an_earlier_round_is_rejected():
    names = _names(4)
    fed = _Federation(names)
    captured = {}

    def capture(stage, direction, name, data):
        if stage == Stage.MASKED_INPUT and direction == "to_server" and name == "p00":
            captured["y"] = decode(data)
        return None

    aggregate(fed.clients_backend, 1, _inputs(names, 64), identities=fed.ids, interceptor=capture, seed=1)

    def replay(stage, direction, name, data):
        if stage == Stage.MASKED_INPUT and direction == "to_server" and name == "p00":
            old = captured["y"]
            return MaskedInput(round_id=2, sender="p00", vector=old.vector, tag=old.tag).to_bytes()
        return None

    xs = _inputs(names, 64, seed=1)
    res = aggregate(fed.clients_backend, 2, xs, identities=fed.ids, interceptor=replay, seed=1)
    # p00's replayed vector never entered the sum: it counts as dropped, the others' sum is exact.
    assert res.survivors == names[1:]
    want = sum(xs[p].astype(np.float64) for p in names[1:])
    assert np.max(np.abs(res.total - want)) < 4 * 2.0**-20


class _AddsRingValues(SecAggClient):
    """A malicious institution: after masking it adds ``delta`` to element ``at`` of its masked vector (the
    last element is the clipped count) and tags the result, so the tag verifies."""

    delta, at = 2**31 - 1, 0

    def _on_masked_input(self, msg):
        genuine = super()._on_masked_input(msg)
        y = genuine.vector.copy()
        y[self.at] = (int(y[self.at]) + self.delta) % 2**32  # ring arithmetic
        tag = InputTag(self._tag_key, masked_input_header(self.session, self.round_id, self.name, y.size))
        tag.update(y)
        return MaskedInput(round_id=self.round_id, sender=self.name, vector=y, tag=tag.tag())


@pytest.mark.parametrize("at", [0, -1], ids=["value", "clipped_count"])
def test_a_sum_outside_n_times_clip_is_never_released(at):
    names = _names(4)

    class Cheat(_AddsRingValues):
        pass

    Cheat.at = at
    cheat = {"p02"}

    class Mixed(SecAggClient):
        def __new__(cls, name, *args, **kwargs):
            return (Cheat if name in cheat else SecAggClient)(name, *args, **kwargs)

    backend = MaskingBackend(client_class=Mixed)
    with pytest.raises(RoundAbortedError, match="outside \\+-4 x clip_range"):
        aggregate(backend, 1, _inputs(names, 32), seed=2)


# ======================================================================================================
# 5. Corrupted shares are identified, so a bad holder cannot abort a round that has enough good ones
# ======================================================================================================

@pytest.mark.parametrize("bad", [1, 4])
def test_corrupted_unmask_shares_are_identified_and_outvoted(bad):
    """n = 40 (k = 16, t = 12, 17 holders per secret). The first institutions to reply corrupt every share they
    release; each share is checked against its dealer's signed commitment, so up to m - t = 5 bad holders per
    neighbourhood cannot stop the round (4aa2a94 tried 64 subsets and aborted on one corrupt first replier)."""
    names = _names(40)
    corrupt = set(names[:bad])
    xs = _inputs(names, 50)

    def tamper(stage, direction, name, data):
        if stage == Stage.UNMASK and direction == "to_server" and name in corrupt:
            msg = decode(data)
            flip = lambda d: {k: v[:-1] + bytes([v[-1] ^ 1]) for k, v in d.items()}  # noqa: E731
            msg.seed_shares, msg.key_shares = flip(msg.seed_shares), flip(msg.key_shares)
            return msg.to_bytes()
        return None

    res = aggregate(MaskingBackend(), 1, xs, interceptor=tamper, dropouts={"p20": "masked_input"}, seed=4)
    server_view = res.measurements
    assert server_view["shares_rejected"] > 0
    want = sum(xs[p].astype(np.float64) for p in res.survivors)
    assert res.survivors == sorted(set(names) - {"p20"}) and np.max(np.abs(res.total - want)) < 40 * 2.0**-22


def test_too_many_corrupted_shares_abort_the_round_naming_the_holders():
    names = _names(5)
    corrupt = {"p00", "p01"}  # t = 4 of 5: two bad holders leave 3 good shares

    def tamper(stage, direction, name, data):
        if stage == Stage.UNMASK and direction == "to_server" and name in corrupt:
            msg = decode(data)
            msg.seed_shares = {k: v[:-1] + bytes([v[-1] ^ 1]) for k, v in msg.seed_shares.items()}
            return msg.to_bytes()
        return None

    with pytest.raises(RoundAbortedError, match=r"only 3 of the 5 shares .* \(corrupted by p00, p01\)"):
        aggregate(MaskingBackend(), 1, _inputs(names, 8), interceptor=tamper, seed=5)


# ======================================================================================================
# 6. The smaller holes
# ======================================================================================================

def test_a_refused_update_is_reported_without_any_of_its_values():
    names = _names(3)
    xs = _inputs(names, 16)
    xs["p01"][5] = 123.456
    backend = MaskingBackend(MaskingSettings(on_out_of_range="refuse"))
    with pytest.raises(SecureAggregationError) as err:
        aggregate(backend, 1, xs, seed=1)
    assert "outside [-8.0, 8.0]" in str(err.value) and "123" not in str(err.value)


def test_a_deeply_nested_header_is_rejected_as_a_protocol_error():
    import struct

    deep = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(ProtocolError):
        decode(b"FSA2" + struct.pack(">I", len(deep)) + deep)


def test_a_low_order_key_aborts_an_honest_institution_instead_of_leaving_it_stuck():
    names = _names(3)
    fed = _Federation(names)
    server, clients = fed.machines(1, _inputs(names, 8))
    reqs = drive_until(server, InProcessParties(clients, stages=STAGES), Stage.SHARE_KEYS)
    roster = decode(reqs["p00"])
    # p01 (malicious, with its genuine identity) advertises the all-zero point as its encryption key.
    evil = roster.adverts[1]
    evil.enc_public_key = bytes(32)
    evil.signature = fed.ids["p01"].sign(evil.signed_payload(server.machine.digest))
    client = clients["p00"].machine
    with pytest.raises(PeerMisbehaviourError, match="low-order encryption key"):
        client.handle(roster)
    assert client.aborted
    # The coordinator never forwards such an advertisement in the first place.
    server2, clients2 = fed.machines(2, _inputs(names, 8))
    setup = server2.start()
    advert = decode(clients2["p01"].handle(setup["p01"]))
    advert.enc_public_key = bytes(32)
    advert.signature = fed.ids["p01"].sign(advert.signed_payload(server2.machine.digest))
    with pytest.raises(AuthenticationError, match="low-order"):
        server2.receive("p01", advert.to_bytes())


def test_a_setup_is_fresh_and_an_institution_answers_it_once():
    names = _names(3)
    fed = _Federation(names)
    _, clients = fed.machines(1, _inputs(names, 8))
    # Production servers (no test seed): same round, participants and settings.
    setup1, setup2 = (fed.server_backend.server(1, names, 8, fed.registry).machine.setup for _ in range(2))
    # Same round, participants and settings: the coordinator's fresh nonce still makes a new digest.
    assert setup1.nonce != setup2.nonce and setup1.digest() != setup2.digest()
    clients["p00"].handle(setup1.to_bytes())
    assert not clients["p00"].machine.aborted
    again = fed.clients_backend.client("p00", fed.ids["p00"], fed.registry)
    with pytest.raises(UnsafeSetupError, match="already answered a setup with this digest"):
        again.handle(setup1.to_bytes())


def test_a_roster_with_a_duplicated_or_replayed_advertisement_is_refused():
    names = _names(3)
    fed = _Federation(names)
    server, clients = fed.machines(1, _inputs(names, 8))
    reqs = drive_until(server, InProcessParties(clients, stages=STAGES), Stage.SHARE_KEYS)
    roster = decode(reqs["p00"])
    dup = KeysBroadcast(round_id=1, adverts=roster.adverts + [roster.adverts[1]])
    with pytest.raises(PeerMisbehaviourError, match="duplicate key advertisement from 'p01'"):
        clients["p00"].machine.handle(dup)
    stale = decode(reqs["p01"])
    stale.adverts[2] = KeyAdvertisement(**{**stale.adverts[2].__dict__, "round_id": 0})
    with pytest.raises(PeerMisbehaviourError, match="is for round 0; replay rejected"):
        clients["p01"].machine.handle(stale)
