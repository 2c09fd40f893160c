"""The attack machinery the secure-aggregation checks share: a federation of five institutions run through the
real backends, the coordinator's view of a round, and the tools a lying coordinator uses (an honest run up to
a chosen stage, stripping masks with stolen secrets).

Protections are switched off through the backends' seams: a registry that accepts any signature, a share
cipher without its tag check (``MaskingBackend(aead=...)``), a client class without the consistency round
(``MaskingBackend(client_class=...)``), institutions that accept any setup (``MaskingBackend(requirements=...)``),
a coordinator machine that neither checks masked-input tags nor the range of the released sum, or one that
rebuilds secrets without the dealers' share commitments (``MaskingBackend(server_class=...)``), or the ``none``
backend instead of masking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedse_threat_model.harness import ProtectionSettings

NAMES = ["inst0", "inst1", "inst2", "inst3", "inst4"]  # complete graph, t = 4 (the defaults for n = 5)


class AcceptAnyRegistry:
    """A public-key registry that verifies nothing: what a deployment without signature checks amounts to."""

    def __init__(self, names: Iterable[str]) -> None:
        self._names = sorted(names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def names(self) -> list[str]:
        return list(self._names)

    def verify(self, name: str, signature: bytes, data: bytes, what: str) -> None:
        return None


class UnauthenticatedAESGCM:
    """AES-GCM with the tag check removed: encryption is unchanged, decryption runs GCM's CTR keystream
    (counter block nonce || 2 for a 96-bit nonce) over the ciphertext and ignores the tag and the AD."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._key = key
        self._gcm = AESGCM(key)

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        return self._gcm.encrypt(nonce, data, associated_data)

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        dec = Cipher(algorithms.AES(self._key), modes.CTR(nonce + (2).to_bytes(4, "big"))).decryptor()
        return dec.update(data[:-16]) + dec.finalize()


def no_consistency_client_class():
    from fedse_secure.secagg.masking import (
        ConsistencyRequest,
        ConsistencySignature,
        Phase,
        SecAggClient,
        UnmaskRequest,
        UnmaskShares,
    )
    from fedse_secure.secagg.masking.messages import survivors_payload

    class NoConsistencyClient(SecAggClient):
        """SecAgg without the consistency round: signs any survivor list and answers every unmask request
        with the shares it asks for, keeping them for later requests."""

        def handle(self, msg):
            if isinstance(msg, ConsistencyRequest) and self.phase in (Phase.CONSISTENCY, Phase.UNMASK, Phase.DONE):
                self.survivors = sorted(msg.survivors)
                self.phase = Phase.UNMASK
                sig = self.identity.sign(survivors_payload(self.session, self.round_id, self.survivors))
                return ConsistencySignature(round_id=self.round_id, sender=self.name, signature=sig)
            if isinstance(msg, UnmaskRequest) and self.phase in (Phase.UNMASK, Phase.DONE):
                alive = set(msg.survivors)
                self.phase = Phase.DONE
                return UnmaskShares(
                    round_id=self.round_id, sender=self.name,
                    seed_shares={p: self._seed_shares[p] for p in sorted(self.shared_with) if p in alive},
                    key_shares={p: self._key_shares[p] for p in sorted(self.shared_with) if p not in alive},
                )
            return super().handle(msg)

    return NoConsistencyClient


def accept_any_requirements():
    """What an institution without its own requirements amounts to: it accepts whatever the coordinator sets up
    (the client of 4aa2a94 only checked t > m/2)."""
    from fedse_secure.secagg.masking import MaskingRequirements

    class AcceptAny(MaskingRequirements):
        def refusal(self, n_listed, n_present, degree, threshold):
            m = min(degree, n_present - 1) + 1
            return None if 2 * threshold > m and threshold <= m else "threshold: not more than half"

    return AcceptAny(colluder_fraction=0.0, dropout_fraction=0.0)


def weakest_accepted(n: int) -> tuple[int, int]:
    """The weakest (degree, threshold) the institutions of 4aa2a94 accepted by default for n participants:
    degree 2 ceil(log2 n) (complete graph up to 32), t = floor(m/2) + 1."""
    import math

    k = n - 1 if n <= 32 else min(n - 1, 2 * math.ceil(math.log2(n)))
    return k, (k + 1) // 2 + 1


def weak_setup_server_class(degree: int, threshold: int):
    """A coordinator that proposes (degree, threshold) whatever its institutions require, and never gives up on
    its own (it skips its live-holder checks)."""
    from fedse_secure.secagg.masking import SecAggServer

    class WeakSetupServer(SecAggServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.setup.degree, self.setup.threshold = degree, threshold
            self.threshold = threshold
            self.digest = self.setup.digest()

        def _require(self, owners, alive, stage):
            return None

    return WeakSetupServer


def no_input_auth_server_class():
    """The coordinator of 4aa2a94: masked inputs summed as they come, no tag, no range check on the sum."""
    import numpy as np

    from fedse_secure.secagg.masking import SecAggServer
    from fedse_secure.secagg.masking.server import sum_and_release

    class NoInputAuthServer(SecAggServer):
        def _check_masked_input(self, m):
            if self._sum is None:
                self._sum, self._released = sum_and_release(self.setup.vector_len + 1, self.dtype)
                self._sum[...] = 0
            np.add(self._sum, m.vector, out=self._sum)

        def _check_range(self, lo, hi, count, survivors):
            return None

    return NoInputAuthServer


def no_share_commitments_server_class():
    """The coordinator of 4aa2a94: shares are not checked against their dealers' commitments; it tries up to 64
    t-subsets of the shares until one rebuilds the committed secret."""
    import itertools

    from fedse_secure.secagg.masking import RoundAbortedError, SecAggServer, SecureAggregationError, shamir

    class NoShareCommitmentsServer(SecAggServer):
        def _rebuild(self, owner, kind, shares, valid):
            for subset in itertools.islice(itertools.combinations(sorted(shares), self.threshold), 64):
                try:
                    secret = shamir.combine([shares[h] for h in subset], self.threshold)
                except SecureAggregationError:
                    continue
                if valid(secret):
                    return secret
            raise RoundAbortedError(f"round {self.round_id}: no {self.threshold} of the shares of {owner!r}'s {kind} "
                                    "rebuild the committed secret (tried 64 subsets); nothing is released")

    return NoShareCommitmentsServer


def masking_backend(settings: ProtectionSettings, *, aead: bool = False, consistency: bool = False,
                    requirements: bool = False, input_auth: bool = False, share_commitments: bool = False,
                    masking_settings=None):
    """The masking backend with the protections this check exercises switched per ``settings``: the keyword
    arguments name the seams the check puts under test (the others stay as shipped)."""
    from fedse_secure.secagg.backends.masking import MaskingBackend

    bases = []
    if input_auth and not settings.on("input-auth"):
        bases.append(no_input_auth_server_class())
    if share_commitments and not settings.on("share-commitments"):
        bases.append(no_share_commitments_server_class())
    server_class = type("ServerWithoutProtections", tuple(bases), {}) if bases else None
    return MaskingBackend(
        masking_settings,
        aead=UnauthenticatedAESGCM if aead and not settings.on("aead") else None,
        client_class=no_consistency_client_class() if consistency and not settings.on("consistency") else None,
        requirements=accept_any_requirements() if requirements and not settings.on("requirements") else None,
        server_class=server_class,
    )


class Federation:
    """NAMES with fixed long-term identities (reused across rounds, as in a deployment), a backend, and the
    registry every party verifies against (one that accepts anything when ``signatures`` is off)."""

    def __init__(self, settings: ProtectionSettings, backend, seed: int, names=None, server_backend=None) -> None:
        from fedse_secure.secagg.masking import IdentityKey, PublicKeyRegistry
        from fedse_secure.secagg.masking.prg import RandomSource

        self.names = list(names or NAMES)
        self.backend, self.seed = backend, seed
        self.server_backend = server_backend or backend
        root = RandomSource.seeded(seed, "threat-check")
        self.identities = {p: IdentityKey.generate(root.child("id/" + p)) for p in self.names}
        self.registry = (PublicKeyRegistry.from_identities(self.identities) if settings.on("signatures")
                         else AcceptAnyRegistry(self.names))

    def aggregate(self, round_id: int, contributions: Mapping[str, np.ndarray], interceptor=None):
        from fedse_secure.secagg.driver import aggregate

        return aggregate(self.backend, round_id, contributions, identities=self.identities, registry=self.registry,
                         interceptor=interceptor, seed=self.seed)

    def machines(self, round_id: int, size: int, inputs: Mapping[str, np.ndarray]):
        """The server machine and every client machine of one round, inputs set, nothing exchanged yet."""
        server = self.server_backend.server(round_id, self.names, size, self.registry, seed=self.seed)
        clients = {p: self.backend.client(p, self.identities[p], self.registry, seed=self.seed) for p in self.names}
        for p in self.names:
            clients[p].set_input(inputs[p])
        return server, clients


def on_messages(fn: Callable[[str, str, str, Any], Any]):
    """A driver interceptor (bytes) around ``fn(stage, direction, name, message)`` on decoded masking messages;
    ``fn`` returns a replacement message or None."""
    from fedse_secure.secagg.masking import decode

    def intercept(stage: str, direction: str, name: str, data: bytes) -> bytes | None:
        replaced = fn(stage, direction, name, decode(data))
        return None if replaced is None else replaced.to_bytes()

    return intercept


def coordinator_view(settings: ProtectionSettings, contributions: Mapping[str, np.ndarray], seed: int,
                     round_id: int = 1):
    """Run one aggregation round and return (result, per-institution vectors the coordinator received, counts).

    With masking, the coordinator receives every protocol message; the only per-institution vector among them
    is the masked input, so that is what an attacker can start from. With ``masking`` off, the coordinator
    receives the updates themselves.
    """
    from fedse_secure.secagg.backends.plaintext import PlaintextBackend
    from fedse_secure.secagg.single_stage import unframe
    from fedse_secure.secagg.masking import MaskedInput, Stage, decode
    from fedse_secure.secagg.masking.quantize import dequantise

    received: dict[str, np.ndarray] = {}
    counts = {"messages_seen": 0}
    n = next(iter(contributions.values())).size
    if not settings.on("masking"):
        def grab_plain(stage, direction, name, data):
            if direction == "to_server":
                counts["messages_seen"] += 1
                header, body = unframe(data, name)
                received[name] = np.frombuffer(body, dtype=header["dtype"]).astype(np.float64)
            return None

        result = Federation(settings, PlaintextBackend(), seed).aggregate(round_id, contributions, grab_plain)
        return result, received, counts

    def grab(stage, direction, name, data):
        if direction == "to_server":
            counts["messages_seen"] += 1
            if stage == Stage.MASKED_INPUT:
                msg = decode(data)
                if isinstance(msg, MaskedInput):
                    received[name] = msg.vector.copy()
        return None

    backend = masking_backend(settings)
    result = Federation(settings, backend, seed).aggregate(round_id, dict(contributions), grab)
    bits = result.measurements["fractional_bits"]
    # The masked vector ends with the masked count of clipped values; the update is the first n elements.
    return result, {p: dequantise(y, bits)[:n] for p, y in received.items()}, counts


def round_to_consistency(settings: ProtectionSettings, size: int, seed: int, consistency: bool = False,
                         server_backend=None):
    """An honest run of the first three stages; returns what the coordinator and every client hold:
    (settings, server machine, client machines, updates, masked inputs)."""
    from fedse_secure.secagg.driver import InProcessParties, drive_until
    from fedse_secure.secagg.masking import Stage, decode

    from fedse_threat_model.harness import updates

    backend = masking_backend(settings, consistency=consistency, requirements=True)
    fed = Federation(settings, backend, seed, server_backend=server_backend)
    xs = updates(NAMES, size, seed)
    server, clients = fed.machines(1, size, xs)
    masked = {}

    def keep_masked(stage, direction, name, data):
        if stage == Stage.MASKED_INPUT and direction == "to_server":
            masked[name] = decode(data).vector.copy()
        return None

    drive_until(server, InProcessParties(clients, stages=backend.stages, interceptor=keep_masked), Stage.CONSISTENCY)
    return backend.settings, server.machine, {p: c.machine for p, c in clients.items()}, xs, masked


def strip_pair_masks(y: np.ndarray, owner: str, owner_mask_key, server, peers: Iterable[str]) -> np.ndarray:
    """Remove ``owner``'s pairwise masks with ``peers`` from its masked vector, given its mask private key."""
    from fedse_secure.secagg.masking import keys
    from fedse_secure.secagg.masking.prg import MaskApplier, MaskStream

    y = y.copy()
    streams = []
    for v in sorted(peers):
        k = keys.pair_mask_key(owner_mask_key, server.adverts[v].mask_public_key, server.session, owner, v)
        streams.append(MaskStream(k, y.dtype, -1 if owner < v else +1))
    MaskApplier(y.dtype).apply(y, streams)
    return y


def strip_self_mask(y: np.ndarray, seed: bytes, session: bytes) -> np.ndarray:
    from fedse_secure.secagg.masking import keys
    from fedse_secure.secagg.masking.prg import MaskApplier, MaskStream

    y = y.copy()
    MaskApplier(y.dtype).apply(y, [MaskStream(keys.self_mask_key(seed, session), y.dtype, -1)])
    return y


def split_survivor_lists(server, clients, victim: str, colluders: list[str]):
    """The lying coordinator's split: "victim alive" to honest holders in group A (the victim signs that list
    too), "victim dropped" to those in group B, as many in B as the key needs; colluders sign both lists and
    hand over the shares they hold. Returns (seed shares, mask-key shares) of the victim it ends up with."""
    from fedse_secure.secagg.masking import ConsistencyRequest, SecureAggregationError, UnmaskRequest
    from fedse_secure.secagg.masking.messages import survivors_payload

    names, t, rid = sorted(clients), server.threshold, server.round_id
    honest = [p for p in names if p != victim and p not in colluders]
    group_b = honest[: max(0, t - len(colluders))]
    group_a = [p for p in honest if p not in group_b] + [victim]
    lists = {"A": names, "B": [p for p in names if p != victim]}
    sigs: dict[str, dict[str, bytes]] = {"A": {}, "B": {}}
    for label, group in (("A", group_a), ("B", group_b)):
        for p in group:
            try:
                sigs[label][p] = clients[p].handle(ConsistencyRequest(round_id=rid, survivors=lists[label])).signature
            except SecureAggregationError:
                pass
        for c in colluders:
            sigs[label][c] = clients[c].identity.sign(survivors_payload(server.session, rid, lists[label]))
    seeds = [clients[c]._seed_shares[victim] for c in colluders]
    mask_keys = [clients[c]._key_shares[victim] for c in colluders]
    for label, group in (("A", group_a), ("B", group_b)):
        for p in group:
            try:
                reply = clients[p].handle(UnmaskRequest(round_id=rid, survivors=lists[label], signatures=sigs[label]))
            except SecureAggregationError:
                continue
            seeds.extend([reply.seed_shares[victim]] if victim in reply.seed_shares else [])
            mask_keys.extend([reply.key_shares[victim]] if victim in reply.key_shares else [])
    return seeds, mask_keys


@dataclass
class RingCut:
    """What the coordinator got from silencing two arcs' borders: the round's result (None if it aborted), the
    error that ended it, the two arcs, and each arc's ring sum with its members' self masks stripped."""

    result: Any
    error: Exception | None
    arcs: list[list[str]]
    arc_sums: list[np.ndarray]


def cut_the_ring(server, clients) -> RingCut:
    """Run a round in which the coordinator, once the graph is known, silences k/2 consecutive institutions at
    two opposite places of the ring, leaving two arcs whose pairwise masks cancel inside each arc. If the round
    completes, strip each arc's self masks with the seeds the survivors release: the arc's partial sum."""
    from fedse_secure.secagg.driver import InProcessParties, drive
    from fedse_secure.secagg.masking import STAGES, SecureAggregationError, Stage, decode, keys, shamir
    from fedse_secure.secagg.masking.graph import graph_seed, ring_order
    from fedse_secure.secagg.masking.prg import MaskApplier, MaskStream

    silent: set[str] = set()
    arcs: list[list[str]] = []
    masked: dict[str, np.ndarray] = {}
    seed_shares: dict[str, list[bytes]] = {}

    def watch(stage, direction, name, data):
        if direction == "to_server" and stage == Stage.MASKED_INPUT:
            masked[name] = decode(data).vector.copy()
        if direction == "to_server" and stage == Stage.UNMASK:
            for owner, share in decode(data).seed_shares.items():
                seed_shares.setdefault(owner, []).append(share)
        return None

    def exchange(stage, requests):
        m = server.machine
        if stage == Stage.SHARE_KEYS and not silent:
            order = ring_order(sorted(m.advertised), graph_seed(m.session))
            half, mid = m.setup.degree // 2, len(order) // 2
            silent.update(order[:half] + order[mid : mid + half])
            arcs.extend([order[half:mid], order[mid + half :]])
        live = {p: r for p, r in requests.items() if p not in silent}
        return InProcessParties(clients, stages=STAGES, refusals="drop", interceptor=watch)(stage, live)

    try:
        result = drive(server, exchange)
    except SecureAggregationError as err:
        return RingCut(None, err, arcs, [])
    m = server.machine
    sums = []
    for arc in arcs:  # pairwise masks cancel inside the arc; the self masks come off with the released seeds
        y = sum(masked[p].astype(np.uint64) for p in arc).astype(m.dtype)
        streams = [MaskStream(keys.self_mask_key(shamir.combine(seed_shares[p], m.threshold), m.session), y.dtype, -1)
                   for p in arc]
        MaskApplier(y.dtype).apply(y, streams)
        sums.append(y)
    return RingCut(result, None, arcs, sums)


def exposure_rate(n: int, colluders: int, degree: int, threshold: int, trials: int, seed: int = 0) -> float:
    """Fraction of random rings (``colluders`` of n placed at random) on which the coalition can expose someone:
    a neighbourhood holding 2t - m colluders (split survivor lists), or two disjoint windows of k/2 institutions
    each holding g = t - k/2 - 1 colluders (a cut whose arcs the coordinator unmasks separately)."""
    rng = np.random.default_rng(seed)
    half, m = degree // 2, degree + 1
    need_split, g = 2 * threshold - m, threshold - half - 1
    idx = np.arange(n)
    hits = 0
    for _ in range(trials):
        bad = np.zeros(n, np.int64)
        bad[rng.choice(n, colluders, replace=False)] = 1
        csum = np.concatenate([[0], np.cumsum(np.concatenate([bad, bad[: degree + 1]]))])
        centre = bad[(idx + half) % n]
        around = csum[idx + degree + 1] - csum[idx] - centre
        split = bool(np.any((around >= need_split) & (centre == 0)))
        heavy = np.flatnonzero(csum[idx + half] - csum[idx] >= max(g, 1))
        cut = heavy.size > 0 and half <= heavy.max() - heavy.min() <= n - half
        hits += split or cut
    return hits / trials
