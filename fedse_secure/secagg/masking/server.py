"""The coordinator's state machine. No I/O: it produces each stage's requests, takes the replies one by one,
and is told when a stage closes.

How a transport drives it::

    server = SecAggServer(round_id, participants, vector_len, config, registry)
    requests = server.start()                      # {institution: SetupRequest}
    while requests:
        send each requests[name].to_bytes() to name
        until every addressee replied or settings.stage_timeout_s elapsed:
            try: server.receive(decode(reply_bytes))
            except ProtocolError: log it; the sender is then treated like a silent institution
        requests = server.advance()                # closes the stage: whoever did not reply has dropped
    result = server.result                         # AggregateResult; only the survivors' sum

The server keeps no clock: the transport owns the timeout (``settings.stage_timeout_s`` per stage) and the
network. Dropouts are signalled to the server *only* by calling :meth:`advance` before every addressee has
replied; the silent ones are then dropped, and the server checks that every secret it will need can still be
rebuilt (at least ``t`` live holders per neighbourhood), or aborts without releasing anything.

States (:class:`~.messages.Phase`): ``IDLE``, the five stages, ``DONE``; ``ABORTED`` from anywhere, sticky.
:meth:`receive` either accepts a reply or raises :class:`ProtocolError` / :class:`AuthenticationError` with the
machine unchanged (another round or stage, a sender not asked or already dropped, a duplicate, a bad signature
or tag); a late masked vector never enters the sum. :meth:`advance` either opens the next stage or aborts
(:class:`RoundAbortedError`).

Alive sets, by the stage after which they are known: ``advertised`` (sent keys), ``shared`` (sent encrypted
shares), ``masked`` (sent a masked input: the survivors, whose inputs are in the sum), ``signed`` (signed the
survivor list), ``unmasked`` (sent their shares).

Released sums are checked against their range: each element of a sum of s survivors' inputs lies within
``+-s * round(clip * 2^f)``; a sum outside it (an institution that added arbitrary ring values) aborts the
round. A malicious institution can still move each element of the sum anywhere within that range (it weighs as
much as all s survivors pushing one way): bounding its influence further needs proofs on the inputs (ACORN).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedse_secure.secagg.base import AggregateResult
from fedse_secure.secagg.encoding import max_quantised
from fedse_secure.secagg.masking import keys, shamir
from fedse_secure.secagg.masking.errors import (
    AuthenticationError,
    ProtocolError,
    RoundAbortedError,
    SecureAggregationError,
)
from fedse_secure.secagg.masking.graph import graph_seed, neighbour_sets, roster_digest
from fedse_secure.secagg.masking.identity import PublicKeyRegistry
from fedse_secure.secagg.masking.messages import (
    NEXT_PHASE,
    REPLIES,
    TAG_BYTES,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShares,
    KeyAdvertisement,
    KeysBroadcast,
    MaskedInput,
    MaskedInputRequest,
    Phase,
    ProtocolMessage,
    SetupRequest,
    Stage,
    UnmaskRequest,
    UnmaskShares,
    commitments_payload,
    masked_input_header,
    survivors_payload,
)
from fedse_secure.secagg.masking.prg import CHUNK_ELEMENTS, InputTag, MaskApplier, MaskStream, RandomSource
from fedse_secure.secagg.masking.quantize import RING_DTYPES, SIGNED_DTYPES, release_into, required_ring_bits
from fedse_secure.secagg.masking.settings import MaskingSettings

_COMMITMENT = 32
_STAGE_NAMES = frozenset(s.value for s in Stage)


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
        try:
            params = self.config.parameters(n)
        except ValueError as err:
            raise SecureAggregationError(f"round {round_id}: federation.secure_aggregation: {err}") from None
        f = self.config.precision(n)
        # A fresh X25519 key per round: the institutions tag their masked inputs against it.
        self._key = keys.new_x25519(self.rng)
        self.setup = SetupRequest(
            round_id=self.round_id,
            participants=sorted(names),
            threshold=params.threshold,
            degree=params.degree,
            ring_bits=required_ring_bits(n, self.config.clip_range, f),
            fractional_bits=f,
            clip_range=float(self.config.clip_range),
            vector_len=int(vector_len),
            nonce=self.rng.bytes(32),
            server_key=keys.x25519_public_bytes(self._key),
        )
        self.digest = self.setup.digest()
        self.threshold = params.threshold
        self.dtype = RING_DTYPES[self.setup.ring_bits]
        self.phase: Phase = Phase.IDLE
        self.abort_reason: str | None = None
        self.expected: set[str] = set()
        self.replies: dict[str, ProtocolMessage] = {}
        self.participants = frozenset(names)
        self.advertised: frozenset[str] = frozenset()
        self.shared: frozenset[str] = frozenset()
        self.masked: frozenset[str] = frozenset()
        self.signed: frozenset[str] = frozenset()
        self.unmasked: frozenset[str] = frozenset()
        self.adverts: dict[str, KeyAdvertisement] = {}
        self.commitments: dict[str, dict[str, bytes]] = {}
        self.signatures: dict[str, bytes] = {}
        self._tag_keys: dict[str, bytes] = {}
        # The ring sum of the masked inputs, and the float64 view of the same memory it is released into.
        self._sum: np.ndarray | None = None
        self._released: np.ndarray | None = None
        self.values_clipped = 0
        self.rejected_shares: dict[str, list[str]] = {}
        self.result: AggregateResult | None = None
        self.server_seconds: dict[str, float] = {s: 0.0 for s in Stage}
        self.keystream_bytes = 0

    # -- public API -----------------------------------------------------------------------------------------
    @property
    def stage(self) -> Stage | None:
        """The open stage, or None before start() and after the round ended."""
        return Stage(self.phase.value) if self.phase.value in _STAGE_NAMES else None

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    def holders(self, owner: str) -> frozenset[str]:
        """Who holds shares of ``owner``'s secrets: its neighbourhood (neighbours and itself)."""
        return self.neighbours[owner] | {owner}

    def start(self) -> dict[str, ProtocolMessage]:
        if self.phase is not Phase.IDLE:
            raise ProtocolError(f"round {self.round_id} already started")
        return self._open({p: self.setup for p in self.setup.participants})

    def receive(self, msg: ProtocolMessage) -> None:
        """Accept one reply of the open stage, or raise :class:`ProtocolError` with nothing changed."""
        self._not_aborted()
        stage = self.stage
        t0 = time.perf_counter()
        try:
            self._receive(stage, msg)
        finally:
            if stage is not None:
                self.server_seconds[stage] += time.perf_counter() - t0

    def advance(self) -> dict[str, ProtocolMessage]:
        """Close the open stage (silent institutions have dropped) and return the next stage's requests; after
        the unmask stage, compute :attr:`result` and return ``{}``. Any failure aborts the round for good."""
        self._not_aborted()
        stage = self.stage
        if stage is None:
            raise ProtocolError(f"round {self.round_id}: advance() called before start() or after the round ended")
        t0 = time.perf_counter()
        try:
            return getattr(self, f"_after_{stage}")(frozenset(self.replies))
        except SecureAggregationError as err:
            self.phase, self.abort_reason = Phase.ABORTED, str(err)
            self._sum = self._released = None
            if isinstance(err, RoundAbortedError):
                raise
            raise RoundAbortedError(str(err)) from None
        finally:
            self.server_seconds[stage] += time.perf_counter() - t0

    # -- internals ------------------------------------------------------------------------------------------
    def _not_aborted(self) -> None:
        if self.phase is Phase.ABORTED:
            raise RoundAbortedError(f"round {self.round_id} was aborted ({self.abort_reason}); nothing is released")

    def _open(self, requests: dict[str, ProtocolMessage]) -> dict[str, ProtocolMessage]:
        self.phase = NEXT_PHASE[self.phase]
        self.expected = set(requests)
        self.replies = {}
        return requests

    def _receive(self, stage: Stage | None, msg: ProtocolMessage) -> None:
        if stage is None:
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
        if sender not in self.participants:
            raise ProtocolError(f"round {self.round_id}: {sender!r} is not a participant of this round; rejected")
        if sender not in self.expected:
            raise ProtocolError(f"round {self.round_id}: {sender!r} has dropped out of this round; its {stage} reply "
                                "is rejected")
        if sender in self.replies:
            raise ProtocolError(f"round {self.round_id}: duplicate {stage} reply from {sender!r}; rejected")
        getattr(self, f"_check_{stage}")(msg)
        if isinstance(msg, MaskedInput):
            # Already in the running sum; keeping the vector would make server memory O(n * size).
            msg = MaskedInput(round_id=msg.round_id, sender=sender, vector=np.zeros(0, dtype=self.dtype))
        self.replies[sender] = msg

    def _check_advertise_keys(self, a: KeyAdvertisement) -> None:
        if not (len(a.mask_public_key) == len(a.enc_public_key) == len(a.seed_commitment) == 32):
            raise ProtocolError(f"round {self.round_id}: malformed key advertisement from {a.sender!r}; rejected")
        self.registry.verify(a.sender, a.signature, a.signed_payload(self.digest),
                             f"round {self.round_id}: key advertisement")
        try:
            # Low-order keys would give a known (all-zero) shared secret; X25519 refuses them.
            self._key.exchange(keys.X25519PublicKey.from_public_bytes(a.mask_public_key))
            self._key.exchange(keys.X25519PublicKey.from_public_bytes(a.enc_public_key))
        except ValueError:
            raise AuthenticationError(f"round {self.round_id}: {a.sender!r} advertised a low-order X25519 key; "
                                      "rejected") from None

    def _check_share_keys(self, m: EncryptedShares) -> None:
        want = self.neighbours[m.sender]
        if set(m.ciphertexts) != want:
            raise ProtocolError(
                f"round {self.round_id}: {m.sender!r} encrypted shares for {sorted(m.ciphertexts)[:5]}, expected its "
                f"{len(want)} neighbours; rejected"
            )
        if set(m.commitments) != want | {m.sender} or any(len(c) != 2 * _COMMITMENT for c in m.commitments.values()):
            raise ProtocolError(f"round {self.round_id}: {m.sender!r} sent malformed share commitments; rejected")
        self.registry.verify(m.sender, m.signature,
                             commitments_payload(self.session, self.round_id, m.sender, m.commitments),
                             f"round {self.round_id}: share commitments")

    def _check_masked_input(self, m: MaskedInput) -> None:
        v = m.vector
        want = self.setup.vector_len + 1
        if v.dtype != self.dtype or v.ndim != 1 or v.size != want or len(m.tag) != TAG_BYTES:
            raise ProtocolError(
                f"round {self.round_id}: masked vector of {m.sender!r} is {v.dtype}[{v.size}], expected "
                f"{self.dtype}[{want}] with a {TAG_BYTES}-byte tag; rejected"
            )
        # Sum and tag in one pass while each chunk is in cache; on a bad tag the vector is taken out again,
        # so the machine is unchanged. The server never stores individual masked vectors. The sum reads the
        # chunk from memory first: its two streams keep more reads in flight than the tag's one. The first
        # input is copied rather than added to zeros: np.empty gets huge pages, calloc's zeros fault in 4 KiB.
        first = self._sum is None
        if first:
            self._sum, self._released = sum_and_release(want, self.dtype)
        tag = InputTag(self._tag_keys[m.sender], masked_input_header(self.session, self.round_id, m.sender, want))
        total = self._sum
        for start in range(0, want, CHUNK_ELEMENTS):
            chunk = v[start : start + CHUNK_ELEMENTS]
            part = total[start : start + CHUNK_ELEMENTS]
            if first:
                part[...] = chunk
            else:
                np.add(part, chunk, out=part)
            tag.update(chunk)
        if not hmac.compare_digest(tag.tag(), m.tag):
            if first:
                self._sum = self._released = None
            else:
                np.subtract(total, v, out=total)
            raise AuthenticationError(
                f"round {self.round_id}: the masked input of {m.sender!r} fails its tag (tampered, relabelled or "
                "replayed); rejected, it is not in the sum"
            )

    def _check_consistency(self, m: ConsistencySignature) -> None:
        self.registry.verify(m.sender, m.signature, self._survivors_payload,
                             f"round {self.round_id}: survivor-list signature")

    def _check_unmask(self, m: UnmaskShares) -> None:
        u = m.sender
        hold = self.holders(u) & self.shared
        want_seed, want_key = hold & self.masked, hold - self.masked
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

    def _after_advertise_keys(self, alive: frozenset[str]) -> dict[str, ProtocolMessage]:
        if len(alive) < max(2, self.threshold):
            raise RoundAbortedError(
                f"round {self.round_id}: only {len(alive)} of {len(self.setup.participants)} institutions advertised "
                f"keys, fewer than the threshold t={self.threshold}; the round is abandoned and nothing is released"
            )
        self.advertised = alive
        self.adverts = {p: self.replies[p] for p in sorted(alive)}  # type: ignore[misc]
        roster = list(self.adverts.values())
        self.session = roster_digest(self.digest, roster)
        self.neighbours = neighbour_sets(sorted(alive), self.setup.degree, graph_seed(self.session))
        for p, a in self.adverts.items():
            self._tag_keys[p] = keys.input_tag_key(self._key, a.enc_public_key, self.session, p)
        self._require(alive, alive, Stage.ADVERTISE_KEYS)
        broadcast = KeysBroadcast(round_id=self.round_id, adverts=roster)
        return self._open({u: broadcast for u in sorted(alive)})

    def _after_share_keys(self, alive: frozenset[str]) -> dict[str, ProtocolMessage]:
        self.shared = alive
        self._require(alive, alive, Stage.SHARE_KEYS)
        inbox: dict[str, dict[str, bytes]] = {v: {} for v in alive}
        for u in sorted(alive):
            reply = self.replies[u]
            self.commitments[u] = reply.commitments  # type: ignore[attr-defined]
            for v, ct in reply.ciphertexts.items():  # type: ignore[attr-defined]
                if v in inbox:
                    inbox[v][u] = ct
        return self._open({v: MaskedInputRequest(round_id=self.round_id, ciphertexts=inbox[v]) for v in sorted(alive)})

    def _after_masked_input(self, alive: frozenset[str]) -> dict[str, ProtocolMessage]:
        self.masked = alive
        if not alive:
            raise RoundAbortedError(f"round {self.round_id}: no institution sent a masked input; round abandoned")
        self._require(self.shared, alive, Stage.MASKED_INPUT)
        self.survivor_list = sorted(alive)
        self._survivors_payload = survivors_payload(self.session, self.round_id, self.survivor_list)
        req = ConsistencyRequest(round_id=self.round_id, survivors=self.survivor_list)
        return self._open({u: req for u in self.survivor_list})

    def _after_consistency(self, alive: frozenset[str]) -> dict[str, ProtocolMessage]:
        self.signed = alive
        self._require(self.shared, alive, Stage.CONSISTENCY)
        self.signatures = {u: self.replies[u].signature for u in alive}  # type: ignore[attr-defined]
        return self._open({
            u: UnmaskRequest(round_id=self.round_id, survivors=self.survivor_list,
                             signatures={v: self.signatures[v] for v in sorted(self.holders(u) & alive)})
            for u in sorted(alive)
        })

    def _after_unmask(self, alive: frozenset[str]) -> dict[str, ProtocolMessage]:
        self.unmasked = alive
        self._require(self.shared, alive, Stage.UNMASK)
        self._unmask()
        self.phase = Phase.DONE
        self.expected, self.replies = set(), {}
        return {}

    def _rebuild(self, owner: str, kind: str, shares: dict[str, bytes], valid) -> bytes:
        """``owner``'s secret from the shares its holders released. The first t shares almost always do it; if
        not, each share is checked against the owner's signed commitment and the good ones are used, so bad
        holders (recorded in :attr:`rejected_shares`) cannot stop a round that has t good ones."""
        t = self.threshold
        holders = sorted(shares)
        try:
            secret = shamir.combine([shares[h] for h in holders[:t]], t)
            if valid(secret):
                return secret
        except SecureAggregationError:
            pass
        offset = 0 if kind == "seed" else _COMMITMENT
        signed = self.commitments.get(owner, {})
        good = [h for h in holders
                if keys.share_commitment(self.session, owner, h, kind, shares[h])
                == signed.get(h, b"")[offset : offset + _COMMITMENT]]
        bad = sorted(set(holders) - set(good))
        if bad:
            self.rejected_shares.setdefault(owner, []).extend(bad)
        if len(good) < t:
            raise RoundAbortedError(
                f"round {self.round_id}: only {len(good)} of the {len(holders)} shares of {owner!r}'s {kind} match its "
                f"signed commitments (corrupted by {', '.join(bad[:5])}), fewer than t={t}; the round is abandoned "
                "and nothing is released"
            )
        try:
            secret = shamir.combine([shares[h] for h in good[:t]], t)
        except SecureAggregationError:
            secret = None
        if secret is not None and valid(secret):
            return secret
        raise RoundAbortedError(
            f"round {self.round_id}: {owner!r} dealt shares of its {kind} that match its own commitments but do not "
            "rebuild the secret it committed to (the dealer is at fault); the round is abandoned and nothing is "
            "released"
        )

    def _check_range(self, lo: int, hi: int, count: int, survivors: list[str]) -> None:
        """Abort unless the unmasked sum is a sum of ``len(survivors)`` clipped inputs: every element (smallest
        ``lo``, largest ``hi``) within ``+-s round(clip 2^f)``, the clipped count within ``[0, s round(clip 2^f)]``."""
        bound = len(survivors) * max_quantised(self.setup.clip_range, self.setup.fractional_bits)
        if lo < -bound or hi > bound or not 0 <= count <= bound:
            raise RoundAbortedError(
                f"round {self.round_id}: the unmasked sum lies outside +-{len(survivors)} x clip_range (an institution "
                "sent a masked input that does not encode clipped values); the round is abandoned and nothing is "
                "released"
            )

    def _unmask(self) -> None:
        shared, masked = self.shared, self.masked
        seed_shares: dict[str, dict[str, bytes]] = {u: {} for u in masked}
        key_shares: dict[str, dict[str, bytes]] = {u: {} for u in shared - masked}
        for holder, reply in self.replies.items():
            for owner, s in reply.seed_shares.items():  # type: ignore[attr-defined]
                seed_shares[owner][holder] = s
            for owner, s in reply.key_shares.items():  # type: ignore[attr-defined]
                key_shares[owner][holder] = s
        streams: list[MaskStream] = []
        for u in sorted(masked):
            commitment = self.adverts[u].seed_commitment
            seed = self._rebuild(u, "seed", seed_shares[u],
                                 lambda s, u=u, c=commitment: keys.seed_commitment(s, self.digest, u) == c)
            streams.append(MaskStream(keys.self_mask_key(seed, self.session), self.dtype, -1))
        for w in sorted(shared - masked):
            raw = self._rebuild(w, "key", key_shares[w], lambda s, w=w: _mask_public(s) == self.adverts[w].mask_public_key)
            sk = X25519PrivateKey.from_private_bytes(raw)
            for v in sorted(self.neighbours[w] & masked):
                k = keys.pair_mask_key(sk, self.adverts[v].mask_public_key, self.session, w, v)
                # v added this mask with + when v < w; remove it with the opposite sign.
                streams.append(MaskStream(k, self.dtype, -1 if v < w else +1))
        total, released = self._sum, self._released
        n = released.size  # the sum has one more element: the clipped count
        signed = SIGNED_DTYPES[self.setup.ring_bits]
        fractional_bits = self.setup.fractional_bits
        lo, hi, count = 0, 0, 0

        def finish_chunk(start: int, chunk: np.ndarray) -> None:
            # The range check and the float64 result, while the unmasked chunk is still in cache.
            nonlocal lo, hi, count
            if start + chunk.size > n:  # read now: the floats of a chunk released after this one cover its slot
                count = int(chunk[n - start :].view(signed)[0])
            values = chunk[: max(0, n - start)].view(signed)
            if values.size:
                out = released[start : start + values.size]
                if np.may_share_memory(values, out):  # the first chunk (every chunk in a 64-bit ring)
                    values = values.copy()
                chunk_lo, chunk_hi = release_into(values, out, fractional_bits)
                lo, hi = min(lo, chunk_lo), max(hi, chunk_hi)

        def warm_release(start: int, stop: int, chunk: np.ndarray) -> np.ndarray:
            # The memory finish_chunk writes next, for the mask kernel to bring into cache during its AES rounds.
            return released[start : min(stop, n)]

        applier = MaskApplier(self.dtype)
        # Last chunk first: a chunk's floats overwrite only the ring slots of the chunks after it.
        applier.apply(total, streams, before_chunk=warm_release, after_chunk=finish_chunk, reverse=True)
        self.keystream_bytes = applier.keystream_bytes
        survivors = sorted(masked)
        self._check_range(lo, hi, count, survivors)
        self.values_clipped = count
        self.result = AggregateResult(
            total=released,
            survivors=survivors,
            dropped=sorted(set(self.setup.participants) - masked),
            measurements={
                "values_clipped": self.values_clipped,
                "ring_bits": self.setup.ring_bits,
                "fractional_bits": self.setup.fractional_bits,
                "threshold": self.threshold,
                "graph_degree": self.setup.degree,
                "tolerated_colluders": max(0, 2 * self.threshold - min(self.setup.degree, len(self.advertised) - 1) - 2),
                "n_participants": len(self.setup.participants),
                "n_survivors": len(survivors),
                "n_dropped": len(self.setup.participants) - len(survivors),
                "shares_rejected": sum(len(v) for v in self.rejected_shares.values()),
                "server_keystream_bytes": self.keystream_bytes,
            },
        )
        self._sum = self._released = None


def sum_and_release(size: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """A ring vector of ``size`` elements (the sum: the update and the clipped count) and a float64 vector of
    ``size - 1`` elements (the released update) in one allocation, starting at the same address. The server
    releases the sum into the memory that holds it, so it holds 8 bytes a parameter, as the plaintext path's float64
    sum does, instead of 12. On the benchmark's VM the second buffer's fresh pages stalled the unmask stage (76-183
    ms of system time in 7 of 20 rounds; at most 8 ms after), though steady rounds are no faster
    (``benchmarks/secagg_stalls.py``)."""
    dtype = np.dtype(dtype)
    memory = np.empty(max(8 * (size - 1), dtype.itemsize * size), dtype=np.uint8)
    return memory[: dtype.itemsize * size].view(dtype), memory[: 8 * (size - 1)].view(np.float64)


def _mask_public(raw: bytes) -> bytes | None:
    try:
        return keys.x25519_public_bytes(X25519PrivateKey.from_private_bytes(raw))
    except ValueError:
        return None
