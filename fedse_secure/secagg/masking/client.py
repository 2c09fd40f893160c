"""The client (institution) state machine. No I/O: :meth:`SecAggClient.handle` takes the server's request
for a stage and returns the reply to send back.

How a transport drives it::

    client = SecAggClient(name, identity, registry, config)   # once per round
    client.set_input(flat_float_vector)                       # any time before the masked_input request
    for each request message that arrives (SetupRequest, KeysBroadcast, MaskedInputRequest,
                                           ConsistencyRequest, UnmaskRequest, in that order):
        reply = client.handle(decode(wire_bytes))             # raises on anything suspicious
        send(reply.to_bytes())

A message for another round or out of stage order is rejected with :class:`ProtocolError` and leaves the
client unchanged (a replayed or stray message cannot derail it). Any other error means the client refuses to
continue: it moves to ``aborted`` and answers nothing more; the transport should simply not reply, which the
server treats as a dropout. A client never needs a timeout of
its own: if the server goes silent, nothing is revealed.

Security rules enforced here, not left to the transport:

* every key advertisement must carry a valid Ed25519 signature from the registry over this round's setup
  digest, and the client's own advertisement must come back unchanged (a server swapping keys is caught);
* every share ciphertext must pass AES-GCM with the setup digest, round, sender and receiver in the AD
  (tampered, replayed or misdirected shares are rejected);
* the client signs the survivor list only if it includes the client itself, and releases shares only if at
  least ``t`` of its neighbourhood signed exactly that list, no signer is listed as dropped, and every
  signature verifies;
* for each peer it reveals either the self-mask seed share (peer survived) or the mask-key share (peer
  dropped), never both, and it unmasks only once per round.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedse_secure.secagg.masking import keys, shamir
from fedse_secure.secagg.masking.errors import (
    AuthenticationError,
    InvalidUpdateError,
    ProtocolError,
    RoundAbortedError,
    SecureAggregationError,
)
from fedse_secure.secagg.masking.graph import neighbour_sets
from fedse_secure.secagg.masking.identity import IdentityKey, PublicKeyRegistry
from fedse_secure.secagg.masking.settings import MaskingSettings
from fedse_secure.secagg.masking.messages import (
    REQUESTS,
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
from fedse_secure.secagg.encoding import check_update
from fedse_secure.secagg.masking.quantize import RING_DTYPES, ChunkQuantiser, required_ring_bits

_NONCE = 12


class SecAggClient:
    """One institution's side of one secure-aggregation round."""

    def __init__(
        self,
        name: str,
        identity: IdentityKey,
        registry: PublicKeyRegistry,
        config: MaskingSettings | None = None,
        *,
        vector: np.ndarray | None = None,
        rng: RandomSource | None = None,
        aead: Callable[[bytes], AESGCM] = AESGCM,
    ) -> None:
        self.name = name
        self.identity = identity
        self.registry = registry
        self.config = config or MaskingSettings()
        # The share cipher, injected so a threat check can swap in a broken one without patching this module.
        self.aead = aead
        self.rng = rng or RandomSource()
        self.expecting: str = Stage.ADVERTISE_KEYS
        self.values_clipped = 0
        self.mask_seconds = 0.0
        self.mask_cpu_seconds = 0.0
        self.keystream_bytes = 0
        self._vector: np.ndarray | None = None
        # Per peer: "seed" or "key" once a share of that peer's secret has been released.
        self._revealed: dict[str, str] = {}
        if vector is not None:
            self.set_input(vector)

    # -- public API -----------------------------------------------------------------------------------------
    def set_input(self, vector: np.ndarray) -> None:
        self._vector = check_update(self.name, vector)

    @property
    def done(self) -> bool:
        return self.expecting == "done"

    def handle(self, msg: ProtocolMessage) -> ProtocolMessage:
        if self.expecting in ("done", "aborted"):
            raise ProtocolError(
                f"{self.name}: round {getattr(self, 'round_id', '?')} is {self.expecting}; a {type(msg).__name__} "
                "is refused (a client unmasks once per round)"
            )
        if not isinstance(msg, REQUESTS[self.expecting]):
            raise ProtocolError(
                f"{self.name}: got a {type(msg).__name__} ({msg.STAGE}) while expecting the {self.expecting} "
                "request; stages must come in order"
            )
        if self.expecting != Stage.ADVERTISE_KEYS and msg.round_id != self.round_id:
            raise ProtocolError(
                f"{self.name}: message for round {msg.round_id} during round {self.round_id}; stale or replayed, "
                "rejected"
            )
        handler = {
            Stage.ADVERTISE_KEYS: self._advertise,
            Stage.SHARE_KEYS: self._share_keys,
            Stage.MASKED_INPUT: self._masked_input,
            Stage.CONSISTENCY: self._consistency,
            Stage.UNMASK: self._unmask,
        }[self.expecting]
        try:
            reply = handler(msg)
        except SecureAggregationError:
            self.expecting = "aborted"
            raise
        i = Stage.ALL.index(self.expecting)
        self.expecting = Stage.ALL[i + 1] if i + 1 < len(Stage.ALL) else "done"
        return reply

    # -- stages ---------------------------------------------------------------------------------------------
    def _advertise(self, setup: SetupRequest) -> KeyAdvertisement:
        n = len(setup.participants)
        if self.name not in setup.participants:
            raise ProtocolError(f"{self.name}: the setup for round {setup.round_id} does not list this client")
        if len(set(setup.participants)) != n:
            raise ProtocolError(f"{self.name}: the setup lists a participant twice; refusing")
        if not 1 <= setup.degree <= n - 1:
            raise ProtocolError(f"{self.name}: graph degree {setup.degree} is invalid for {n} participants")
        m = setup.degree + 1
        if not (2 <= setup.threshold <= m and 2 * setup.threshold > m):
            raise ProtocolError(
                f"{self.name}: threshold {setup.threshold} is unsafe for neighbourhoods of {m} (need more than "
                f"half, at most {m}); set federation.secure_aggregation.threshold between {m // 2 + 1} and {m}"
            )
        cfg = self.config
        if cfg.threshold is not None and setup.threshold < min(cfg.threshold, m):
            raise ProtocolError(f"{self.name}: the server lowered the threshold to {setup.threshold} below the configured {cfg.threshold}")
        if (setup.clip_range, setup.fractional_bits) != (cfg.clip_range, cfg.fractional_bits):
            raise ProtocolError(
                f"{self.name}: setup asks for clip_range={setup.clip_range}, fractional_bits={setup.fractional_bits}; "
                f"this client is configured for {cfg.clip_range}, {cfg.fractional_bits}; use the same secagg config"
            )
        if setup.ring_bits not in RING_DTYPES or setup.ring_bits < required_ring_bits(
            n, setup.clip_range, setup.fractional_bits, setup.vector_len
        ):
            raise ProtocolError(f"{self.name}: a {setup.ring_bits}-bit ring can overflow for {n} clients; refusing")
        if len(setup.graph_seed) < 16:
            raise ProtocolError(f"{self.name}: the graph seed is too short")
        self.setup = setup
        self.round_id = setup.round_id
        self.digest = setup.digest()
        self.neighbours = neighbour_sets(setup.participants, setup.degree, setup.graph_seed)[self.name]
        self.neighbourhood = self.neighbours | {self.name}
        self.index = {p: i + 1 for i, p in enumerate(sorted(setup.participants))}
        self._mask_key = keys.new_x25519(self.rng)
        self._enc_key = keys.new_x25519(self.rng)
        self._seed = self.rng.bytes(32)
        advert = KeyAdvertisement(
            round_id=setup.round_id,
            sender=self.name,
            mask_public_key=keys.x25519_public_bytes(self._mask_key),
            enc_public_key=keys.x25519_public_bytes(self._enc_key),
            seed_commitment=keys.seed_commitment(self._seed, self.digest, self.name),
        )
        advert.signature = self.identity.sign(advert.signed_payload(self.digest))
        self._advert = advert
        return advert

    def _share_keys(self, msg: KeysBroadcast) -> EncryptedShares:
        adverts: dict[str, KeyAdvertisement] = {}
        for a in msg.adverts:
            if a.sender not in self.neighbourhood:
                raise ProtocolError(f"{self.name}: got the keys of {a.sender!r}, who is not a neighbour; refusing")
            if a.sender in adverts:
                raise ProtocolError(f"{self.name}: duplicate key advertisement from {a.sender!r}; refusing")
            if a.round_id != self.round_id:
                raise ProtocolError(f"{self.name}: key advertisement of {a.sender!r} is for round {a.round_id}; replay rejected")
            self.registry.verify(a.sender, a.signature, a.signed_payload(self.digest), f"{self.name}: key advertisement")
            adverts[a.sender] = a
        own = adverts.get(self.name)
        if own is None or own != self._advert:
            raise AuthenticationError(f"{self.name}: the server did not return this client's own keys unchanged; refusing")
        pubs = [k for a in adverts.values() for k in (a.mask_public_key, a.enc_public_key)]
        if len(set(pubs)) != len(pubs):
            raise AuthenticationError(f"{self.name}: two advertised public keys are identical; refusing")
        if len(adverts) < self.setup.threshold:
            raise RoundAbortedError(
                f"{self.name}: only {len(adverts)} of its neighbourhood advertised keys, threshold is "
                f"{self.setup.threshold}; the round cannot complete"
            )
        self.adverts = adverts
        holders = sorted(adverts)
        xs = [self.index[h] for h in holders]
        seed_shares = shamir.split(self._seed, self.setup.threshold, xs, self.rng)
        key_shares = shamir.split(keys.x25519_private_bytes(self._mask_key), self.setup.threshold, xs, self.rng)
        self._seed_shares = {self.name: seed_shares[self.index[self.name]]}
        self._key_shares = {self.name: key_shares[self.index[self.name]]}
        self._enc_keys: dict[str, bytes] = {}
        out = {}
        for peer in holders:
            if peer == self.name:
                continue
            k = keys.share_encryption_key(self._enc_key, adverts[peer].enc_public_key, self.digest, self.name, peer)
            self._enc_keys[peer] = k
            nonce = self.rng.bytes(_NONCE)
            pt = seed_shares[self.index[peer]] + key_shares[self.index[peer]]
            aad = keys.share_aad(self.digest, self.round_id, self.name, peer)
            out[peer] = nonce + self.aead(k).encrypt(nonce, pt, aad)
        return EncryptedShares(round_id=self.round_id, sender=self.name, ciphertexts=out)

    def _masked_input(self, msg: MaskedInputRequest) -> MaskedInput:
        for sender, ct in msg.ciphertexts.items():
            k = self._enc_keys.get(sender)
            if k is None:
                raise ProtocolError(f"{self.name}: got shares from {sender!r}, who did not advertise keys to it; refusing")
            try:
                pt = self.aead(k).decrypt(ct[:_NONCE], ct[_NONCE:], keys.share_aad(self.digest, self.round_id, sender, self.name))
            except (InvalidTag, ValueError):
                raise AuthenticationError(
                    f"{self.name}: the shares from {sender!r} fail AES-GCM authentication (tampered, replayed from "
                    "another round, or addressed to another client); refusing"
                ) from None
            seed_share, key_share = pt[: shamir.SHARE_BYTES], pt[shamir.SHARE_BYTES :]
            if (
                len(key_share) != shamir.SHARE_BYTES
                or shamir.share_x(seed_share) != self.index[self.name]
                or shamir.share_x(key_share) != self.index[self.name]
            ):
                raise AuthenticationError(f"{self.name}: the shares from {sender!r} are not for this client; refusing")
            self._seed_shares[sender] = seed_share
            self._key_shares[sender] = key_share
        self.shared_with = frozenset(self._seed_shares)  # neighbours that finished share_keys, and self
        if len(self.shared_with) < self.setup.threshold:
            raise RoundAbortedError(
                f"{self.name}: only {len(self.shared_with)} of its neighbourhood shared keys, threshold is "
                f"{self.setup.threshold}; the round cannot complete"
            )
        if self._vector is None:
            raise InvalidUpdateError(f"{self.name}: no update to mask; call set_input() before the masked_input stage")
        x = check_update(self.name, self._vector, self.setup.vector_len)
        t0, c0 = time.perf_counter(), time.thread_time()
        c = self.setup.clip_range
        bits = self.setup.ring_bits
        dtype = RING_DTYPES[bits]
        streams = [MaskStream(keys.self_mask_key(self._seed, self.digest), dtype, +1)]
        for peer in sorted(self.shared_with - {self.name}):
            k = keys.pair_mask_key(self._mask_key, self.adverts[peer].mask_public_key, self.digest, self.name, peer)
            # Each pair's mask enters once with + and once with -, so it cancels in the sum.
            streams.append(MaskStream(k, dtype, +1 if self.name < peer else -1))
        out = np.empty(x.size + 1, dtype=dtype)  # + the clipped count, summed under the masks too
        quant = ChunkQuantiser(
            x, c, self.setup.fractional_bits, bits, self.name, refuse=self.config.on_out_of_range == "refuse"
        )
        applier = MaskApplier(dtype)
        applier.apply(out, streams, before_chunk=quant)
        self.values_clipped = quant.values_clipped
        self.keystream_bytes = applier.keystream_bytes
        self.mask_seconds = time.perf_counter() - t0
        self.mask_cpu_seconds = time.thread_time() - c0
        self._vector = None
        # The secrets behind this round's masks now live only as shares held by the neighbours.
        self._seed = b""
        return MaskedInput(round_id=self.round_id, sender=self.name, vector=out)

    def _consistency(self, msg: ConsistencyRequest) -> ConsistencySignature:
        survivors = list(msg.survivors)
        if len(set(survivors)) != len(survivors) or not set(survivors) <= self.index.keys():
            raise ProtocolError(f"{self.name}: the survivor list has duplicates or unknown names; refusing to sign")
        if self.name not in survivors:
            raise ProtocolError(
                f"{self.name}: the server lists this client as dropped although it sent its masked input; refusing "
                "to sign (a server doing this is after this client's mask key)"
            )
        s = set(survivors)
        if not (s & self.neighbours) <= self.shared_with:
            raise ProtocolError(f"{self.name}: the survivor list names neighbours that never shared keys; refusing to sign")
        alive = len(s & self.shared_with)
        if alive < self.setup.threshold:
            raise RoundAbortedError(
                f"{self.name}: only {alive} of its neighbourhood survived, threshold is {self.setup.threshold}; "
                "the round is abandoned"
            )
        self.survivors = sorted(survivors)
        sig = self.identity.sign(survivors_payload(self.digest, self.round_id, self.survivors))
        return ConsistencySignature(round_id=self.round_id, sender=self.name, signature=sig)

    def _unmask(self, msg: UnmaskRequest) -> UnmaskShares:
        if sorted(msg.survivors) != self.survivors:
            raise ProtocolError(
                f"{self.name}: the unmask request's survivor list differs from the one this client signed; the server "
                "is equivocating; refusing to release any share"
            )
        payload = survivors_payload(self.digest, self.round_id, self.survivors)
        surv = set(self.survivors)
        signed_by = set()
        for signer, sig in msg.signatures.items():
            if signer not in surv:
                raise ProtocolError(
                    f"{self.name}: {signer!r} signed the survivor list but is listed as dropped; the server is trying "
                    "to obtain a live client's mask key; refusing"
                )
            self.registry.verify(signer, sig, payload, f"{self.name}: survivor-list signature")
            signed_by.add(signer)
        if self.name not in signed_by:
            raise ProtocolError(f"{self.name}: the unmask request lacks this client's own signature; refusing")
        enough = len(signed_by & self.neighbourhood)
        if enough < self.setup.threshold:
            raise ProtocolError(
                f"{self.name}: only {enough} of its neighbourhood signed the survivor list, threshold is "
                f"{self.setup.threshold}; refusing to release shares"
            )
        seed_out, key_out = {}, {}
        for peer in sorted(self.shared_with):
            kind = "seed" if peer in surv else "key"
            if self._revealed.setdefault(peer, kind) != kind:
                raise ProtocolError(f"{self.name}: refusing to reveal both shares for {peer!r}")
            if kind == "seed":
                seed_out[peer] = self._seed_shares[peer]
            else:
                key_out[peer] = self._key_shares[peer]
        # The shares are no longer needed; drop the secrets so a later request cannot extract anything.
        self._seed_shares, self._key_shares = {}, {}
        return UnmaskShares(round_id=self.round_id, sender=self.name, seed_shares=seed_out, key_shares=key_out)
