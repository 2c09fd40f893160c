"""The server (coordinator) state machine. No I/O: it produces each stage's requests, takes the replies one
by one, and is told when a stage closes.

How a transport drives it::

    server = SecAggServer(round_id, participants, vector_len, config, registry)
    requests = server.start()                      # {client name: SetupRequest}
    while requests:
        send each requests[name].to_bytes() to name
        until every addressee replied or settings.stage_timeout_s elapsed:
            try: server.receive(decode(reply_bytes))
            except ProtocolError: log it; the sender is then treated like a silent client
        requests = server.advance()                # closes the stage: whoever did not reply has dropped
    result = server.result                         # AggregateResult; only the survivors' sum

The server keeps no clock: the transport owns the timeout (``settings.stage_timeout_s`` per stage) and the
network. Timeouts and dropouts are signalled to the server *only* by calling :meth:`advance` before every
addressee has replied (``server.expected - server.replies.keys()`` are the ones still awaited); the
server then treats the silent ones as dropped, checks that every secret it will need can still be
reconstructed (at least ``t`` live holders per neighbourhood) and otherwise raises
:class:`RoundAbortedError` without releasing anything. A reply that arrives after its stage closed is
rejected with :class:`ProtocolError` (a late masked vector must never enter the sum).

:meth:`receive` rejects, without changing state: messages for another round, for another stage, from a
client that was not asked (unknown or already dropped), duplicates, and key advertisements or survivor-list
signatures whose Ed25519 signature does not verify against the registry.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedse_secure.secagg.base import AggregateResult
from fedse_secure.secagg.masking import keys, shamir
from fedse_secure.secagg.masking.errors import (
    AuthenticationError,
    ProtocolError,
    RoundAbortedError,
    SecureAggregationError,
)
from fedse_secure.secagg.masking.graph import neighbour_sets
from fedse_secure.secagg.masking.identity import PublicKeyRegistry
from fedse_secure.secagg.masking.settings import MaskingSettings
from fedse_secure.secagg.masking.messages import (
    REPLIES,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShares,
    KeyAdvertisement,
    KeysBroadcast,
    MaskedInput,
    MaskedInputRequest,
    ProtocolMessage,
    SetupRequest,
    Stage,
    UnmaskRequest,
    UnmaskShares,
    survivors_payload,
)
from fedse_secure.secagg.masking.prg import MaskApplier, MaskStream, RandomSource
from fedse_secure.secagg.masking.quantize import RING_DTYPES, SIGNED_DTYPES, dequantise, required_ring_bits


class SecAggServer:
    """The coordinator's side of one round. It only ever learns the sum over the survivors."""

    def __init__(
        self,
        round_id: int,
        participants: Sequence[str],
        vector_len: int,
        config: MaskingSettings | None = None,
        registry: PublicKeyRegistry | None = None,
        *,
        rng: RandomSource | None = None,
    ) -> None:
        self.config = config or MaskingSettings()
        self.registry = registry or PublicKeyRegistry()
        self.round_id = int(round_id)
        self.rng = rng or RandomSource()
        names = list(participants)
        if len(set(names)) != len(names):
            dup = sorted({p for p in names if names.count(p) > 1})
            raise ProtocolError(f"round {round_id}: participants {dup} appear twice; names must be unique")
        if len(names) < 3:
            raise SecureAggregationError(
                f"round {round_id}: secure aggregation needs at least 3 institutions (with 2, each learns the other's "
                f"update from the sum), got {len(names)}"
            )
        missing = [p for p in names if p not in self.registry]
        if missing:
            raise AuthenticationError(f"round {round_id}: {missing} have no identity key in the registry; register them")
        n = len(names)
        params = self.config.parameters(n)
        degree, t = params.degree, params.threshold
        m = params.neighbourhood
        if t > m:
            raise SecureAggregationError(
                f"round {round_id}: threshold {t} exceeds the neighbourhood size {m} (degree {degree} + 1); lower "
                "federation.secure_aggregation.threshold or raise its neighbours"
            )
        if 2 * t <= m:
            raise SecureAggregationError(
                f"round {round_id}: threshold {t} is not more than half of the neighbourhood size {m}, so a "
                f"server could collect two conflicting survivor lists; use federation.secure_aggregation.threshold >= {m // 2 + 1}"
            )
        self.setup = SetupRequest(
            round_id=self.round_id,
            participants=sorted(names),
            threshold=t,
            degree=degree,
            ring_bits=required_ring_bits(n, self.config.clip_range, self.config.fractional_bits, int(vector_len)),
            fractional_bits=self.config.fractional_bits,
            clip_range=float(self.config.clip_range),
            vector_len=int(vector_len),
            graph_seed=self.rng.bytes(32),
        )
        self.digest = self.setup.digest()
        self.threshold = t
        self.neighbours = neighbour_sets(self.setup.participants, degree, self.setup.graph_seed)
        self.dtype = RING_DTYPES[self.setup.ring_bits]
        self.stage: str | None = None
        self.expected: set[str] = set()
        self.replies: dict[str, ProtocolMessage] = {}
        # Alive sets after each stage: U1 (advertised), U2 (shared keys), U3 (masked input), U4 (signed), U5.
        self.alive: dict[str, frozenset[str]] = {}
        self.adverts: dict[str, KeyAdvertisement] = {}
        self.share_dests: dict[str, dict[str, bytes]] = {}
        self.signatures: dict[str, bytes] = {}
        self._sum: np.ndarray | None = None
        self.values_clipped = 0
        self.result: AggregateResult | None = None
        self.server_seconds: dict[str, float] = {s: 0.0 for s in Stage.ALL}
        self.keystream_bytes = 0

    # -- public API -----------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.result is not None

    def holders(self, owner: str) -> frozenset[str]:
        """Who holds shares of ``owner``'s secrets: its neighbourhood (neighbours and itself)."""
        return self.neighbours[owner] | {owner}

    def start(self) -> dict[str, ProtocolMessage]:
        if self.stage is not None:
            raise ProtocolError(f"round {self.round_id} already started")
        return self._open(Stage.ADVERTISE_KEYS, {p: self.setup for p in self.setup.participants})

    def receive(self, msg: ProtocolMessage) -> None:
        t0 = time.perf_counter()
        try:
            self._receive(msg)
        finally:
            if self.stage in self.server_seconds:
                self.server_seconds[self.stage] += time.perf_counter() - t0

    def advance(self) -> dict[str, ProtocolMessage]:
        """Close the current stage (silent clients have dropped) and return the next stage's requests;
        after the unmask stage, compute :attr:`result` and return ``{}``."""
        if self.stage is None or self.done:
            raise ProtocolError(f"round {self.round_id}: advance() called before start() or after the round ended")
        stage = self.stage
        t0 = time.perf_counter()
        try:
            return self._advance()
        finally:
            self.server_seconds[stage] += time.perf_counter() - t0

    # -- internals ------------------------------------------------------------------------------------------
    def _open(self, stage: str, requests: dict[str, ProtocolMessage]) -> dict[str, ProtocolMessage]:
        self.stage = stage
        self.expected = set(requests)
        self.replies = {}
        return requests

    def _receive(self, msg: ProtocolMessage) -> None:
        stage = self.stage
        if stage is None or self.done:
            raise ProtocolError(f"round {self.round_id}: no stage is open; message rejected")
        sender = getattr(msg, "sender", None)
        if msg.round_id != self.round_id:
            raise ProtocolError(
                f"round {self.round_id}: {type(msg).__name__} from {sender!r} is for round {msg.round_id} (stale or "
                "replayed); rejected"
            )
        if not isinstance(msg, REPLIES[stage]):
            raise ProtocolError(
                f"round {self.round_id}: a {type(msg).__name__} from {sender!r} arrived during the {stage} stage, "
                f"which expects {REPLIES[stage].__name__}; rejected (late replies never enter the round)"
            )
        if sender not in self.neighbours:
            raise ProtocolError(f"round {self.round_id}: {sender!r} is not a participant of this round; rejected")
        if sender not in self.expected:
            raise ProtocolError(f"round {self.round_id}: {sender!r} has dropped out of this round; its {stage} reply is rejected")
        if sender in self.replies:
            raise ProtocolError(f"round {self.round_id}: duplicate {stage} reply from {sender!r}; rejected")
        getattr(self, f"_check_{stage}")(msg)
        if isinstance(msg, MaskedInput):
            # Already in the running sum; keeping the vector would make server memory O(n * size).
            msg = MaskedInput(round_id=msg.round_id, sender=sender, vector=np.zeros(0, dtype=self.dtype))
        self.replies[sender] = msg

    def _check_advertise_keys(self, a: KeyAdvertisement) -> None:
        if not (len(a.mask_public_key) == len(a.enc_public_key) == len(a.seed_commitment) == 32):
            raise ProtocolError(f"round {self.round_id}: malformed key advertisement from {a.sender!r}")
        self.registry.verify(a.sender, a.signature, a.signed_payload(self.digest), f"round {self.round_id}: key advertisement")

    def _check_share_keys(self, m: EncryptedShares) -> None:
        want = (self.neighbours[m.sender] & self.alive["U1"]) - {m.sender}
        if set(m.ciphertexts) != want:
            raise ProtocolError(
                f"round {self.round_id}: {m.sender!r} encrypted shares for {sorted(m.ciphertexts)}, expected its live "
                f"neighbours {sorted(want)}; rejected"
            )

    def _check_masked_input(self, m: MaskedInput) -> None:
        v = m.vector
        want = self.setup.vector_len + 1
        if v.dtype != self.dtype or v.ndim != 1 or v.size != want:
            raise ProtocolError(
                f"round {self.round_id}: masked vector of {m.sender!r} is {v.dtype}[{v.size}], expected "
                f"{self.dtype}[{want}]; rejected"
            )
        if self._sum is None:
            self._sum = np.zeros(want, dtype=self.dtype)
        # Summed on arrival, so the server never stores individual masked vectors.
        np.add(self._sum, v, out=self._sum)

    def _check_consistency(self, m: ConsistencySignature) -> None:
        self.registry.verify(m.sender, m.signature, self._survivors_payload, f"round {self.round_id}: survivor-list signature")

    def _check_unmask(self, m: UnmaskShares) -> None:
        u = m.sender
        hold = self.holders(u) & self.alive["U2"]
        want_seed, want_key = hold & self.alive["U3"], hold - self.alive["U3"]
        if set(m.seed_shares) != want_seed or set(m.key_shares) != want_key:
            raise ProtocolError(f"round {self.round_id}: {u!r} sent shares for the wrong peers; rejected")
        if any(len(s) != shamir.SHARE_BYTES for s in (*m.seed_shares.values(), *m.key_shares.values())):
            raise ProtocolError(f"round {self.round_id}: {u!r} sent malformed shares; rejected")

    def _require(self, owners: frozenset[str], alive: frozenset[str], stage: str) -> None:
        """Abort unless every owner still has ``t`` live share holders."""
        if len(alive) < self.threshold:
            raise RoundAbortedError(
                f"round {self.round_id}: only {len(alive)} of {len(self.setup.participants)} institutions answered the "
                f"{stage} stage, fewer than the threshold t={self.threshold}; the round is abandoned and nothing is "
                "released"
            )
        short = sorted(o for o in owners if len(self.holders(o) & alive) < self.threshold)
        if short:
            raise RoundAbortedError(
                f"round {self.round_id}: after the {stage} stage {len(short)} institution(s) ({', '.join(short[:5])}"
                f"{', ...' if len(short) > 5 else ''}) have fewer than t={self.threshold} live share holders, so "
                f"the sum cannot be unmasked; the round is abandoned and nothing is released ({len(alive)} of "
                f"{len(self.setup.participants)} institutions still live)"
            )

    def _advance(self) -> dict[str, ProtocolMessage]:
        stage = self.stage
        alive = frozenset(self.replies)
        if stage == Stage.ADVERTISE_KEYS:
            self.alive["U1"] = alive
            self.adverts = dict(self.replies)  # type: ignore[arg-type]
            self._require(alive, alive, stage)
            return self._open(
                Stage.SHARE_KEYS,
                {
                    u: KeysBroadcast(
                        round_id=self.round_id, adverts=[self.adverts[v] for v in sorted(self.holders(u) & alive)]
                    )
                    for u in sorted(alive)
                },
            )
        if stage == Stage.SHARE_KEYS:
            self.alive["U2"] = alive
            self._require(alive, alive, stage)
            inbox: dict[str, dict[str, bytes]] = {v: {} for v in alive}
            for u in sorted(alive):
                for v, ct in self.replies[u].ciphertexts.items():  # type: ignore[attr-defined]
                    if v in inbox:
                        inbox[v][u] = ct
            return self._open(
                Stage.MASKED_INPUT,
                {v: MaskedInputRequest(round_id=self.round_id, ciphertexts=inbox[v]) for v in sorted(alive)},
            )
        if stage == Stage.MASKED_INPUT:
            self.alive["U3"] = alive
            if not alive:
                raise RoundAbortedError(f"round {self.round_id}: no institution sent a masked input; round abandoned")
            self._require(self.alive["U2"], alive, stage)
            self.survivor_list = sorted(alive)
            self._survivors_payload = survivors_payload(self.digest, self.round_id, self.survivor_list)
            req = ConsistencyRequest(round_id=self.round_id, survivors=self.survivor_list)
            return self._open(Stage.CONSISTENCY, {u: req for u in self.survivor_list})
        if stage == Stage.CONSISTENCY:
            self.alive["U4"] = alive
            self._require(self.alive["U2"], alive, stage)
            self.signatures = {u: self.replies[u].signature for u in alive}  # type: ignore[attr-defined]
            return self._open(
                Stage.UNMASK,
                {
                    u: UnmaskRequest(
                        round_id=self.round_id,
                        survivors=self.survivor_list,
                        signatures={v: self.signatures[v] for v in sorted(self.holders(u) & alive)},
                    )
                    for u in sorted(alive)
                },
            )
        if stage == Stage.UNMASK:
            self.alive["U5"] = alive
            self._require(self.alive["U2"], alive, stage)
            self._unmask()
            self.stage = "done"
            return {}
        raise ProtocolError(f"round {self.round_id}: unknown stage {stage!r}")

    #: How many t-subsets of the shares to try when the first one reconstructs a wrong secret. The signed
    #: commitment tells a good reconstruction from a bad one, so a few corrupted shares need not abort the round.
    MAX_RECONSTRUCTION_TRIES = 64

    def _reconstruct(self, shares: list[bytes], valid) -> bytes | None:
        for tries, subset in enumerate(itertools.combinations(shares, self.threshold)):
            if tries >= self.MAX_RECONSTRUCTION_TRIES:
                break
            try:
                secret = shamir.combine(list(subset), self.threshold)
            except SecureAggregationError:
                continue
            if valid(secret):
                return secret
        return None

    def _unmask(self) -> None:
        u2, u3 = self.alive["U2"], self.alive["U3"]
        seed_shares: dict[str, list[bytes]] = {u: [] for u in u3}
        key_shares: dict[str, list[bytes]] = {u: [] for u in u2 - u3}
        for reply in self.replies.values():
            for owner, s in reply.seed_shares.items():  # type: ignore[attr-defined]
                seed_shares[owner].append(s)
            for owner, s in reply.key_shares.items():  # type: ignore[attr-defined]
                key_shares[owner].append(s)
        streams: list[MaskStream] = []
        for u in sorted(u3):
            commitment = self.adverts[u].seed_commitment
            seed = self._reconstruct(
                seed_shares[u], lambda s, u=u, c=commitment: keys.seed_commitment(s, self.digest, u) == c
            )
            if seed is None:
                raise AuthenticationError(
                    f"round {self.round_id}: no {self.threshold} of the shares of {u!r}'s self-mask seed reconstruct a "
                    "seed that matches its signed commitment (shares were corrupted); the round is abandoned"
                )
            streams.append(MaskStream(keys.self_mask_key(seed, self.digest), self.dtype, -1))
        for w in sorted(u2 - u3):
            raw = self._reconstruct(key_shares[w], lambda s, w=w: _mask_public(s) == self.adverts[w].mask_public_key)
            if raw is None:
                raise AuthenticationError(
                    f"round {self.round_id}: no {self.threshold} of the shares of dropped {w!r}'s mask key reconstruct "
                    "the key behind its signed public key (shares were corrupted); the round is abandoned"
                )
            sk = X25519PrivateKey.from_private_bytes(raw)
            for v in sorted(self.neighbours[w] & u3):
                k = keys.pair_mask_key(sk, self.adverts[v].mask_public_key, self.digest, w, v)
                # v added this mask with + when v < w; remove it with the opposite sign.
                streams.append(MaskStream(k, self.dtype, -1 if v < w else +1))
        total = self._sum
        applier = MaskApplier(self.dtype)
        applier.apply(total, streams)
        self.keystream_bytes = applier.keystream_bytes
        survivors = sorted(u3)
        self.values_clipped = int(total[-1:].view(SIGNED_DTYPES[self.setup.ring_bits])[0])
        self.result = AggregateResult(
            total=dequantise(total[:-1], self.setup.fractional_bits),
            survivors=survivors,
            dropped=sorted(set(self.setup.participants) - u3),
            measurements={
                "values_clipped": self.values_clipped,
                "ring_bits": self.setup.ring_bits,
                "threshold": self.threshold,
                "graph_degree": self.setup.degree,
                "n_participants": len(self.setup.participants),
                "n_survivors": len(survivors),
                "n_dropped": len(self.setup.participants) - len(survivors),
                "server_keystream_bytes": self.keystream_bytes,
            },
        )
        self._sum = None


def _mask_public(raw: bytes) -> bytes | None:
    try:
        return keys.x25519_public_bytes(X25519PrivateKey.from_private_bytes(raw))
    except ValueError:
        return None
