"""The institution's state machine. No I/O: :meth:`SecAggClient.handle` takes the coordinator's request for a
stage and returns the reply to send back.

How a transport drives it::

    client = SecAggClient(name, identity, registry, settings, requirements=...)   # once per round
    client.set_input(flat_float_vector)                       # any time before the masked_input request
    for each request that arrives (SetupRequest, KeysBroadcast, MaskedInputRequest, ConsistencyRequest,
                                   UnmaskRequest, in that order):
        reply = client.handle(decode(wire_bytes))
        send(reply.to_bytes())

States (:class:`~fedse_secure.secagg.masking.messages.Phase`): the five stages in order (the one whose request
is expected next), then ``DONE``, or ``ABORTED`` from anywhere; :data:`~.messages.NEXT_PHASE` is the one
transition table. Two kinds of error, never mixed:

* :class:`ProtocolError` - a request for another round, another stage, or after the round ended: rejected,
  the client is exactly as it was (a stray or replayed message cannot derail it);
* :class:`~fedse_secure.secagg.base.RoundAbortedError` (:class:`UnsafeSetupError`,
  :class:`PeerMisbehaviourError`, ...) or :class:`InvalidUpdateError` - the client refuses to go on: it moves to
  ``ABORTED`` for good (sticky: every later request raises :class:`RoundAbortedError`) and answers nothing more,
  which the coordinator sees as a dropout. A client never needs a timeout of its own: if the coordinator goes
  silent, nothing is revealed.

What the institution enforces itself, never trusting the coordinator:

* the setup is at least as strong as its own :class:`MaskingRequirements` (participants, degree, threshold,
  checked again once it is known who advertised keys), uses its clip range and precision, carries a fresh
  nonce, and has not been answered before by this backend;
* every key advertisement of the roster carries a valid Ed25519 signature over this setup, its own comes back
  unchanged, no public key appears twice; the graph is drawn from all of them (``graph``);
* every share ciphertext passes AES-GCM with session, round, sender and receiver in the AD;
* its masked input carries an AES-GMAC tag for the coordinator bound to session, round and sender;
* it signs the survivor list only if it includes itself and at least ``t`` of its neighbourhood, and releases
  shares only against ``t`` valid signatures of its neighbourhood on exactly that list, none by an institution
  listed as dropped; per peer it reveals the self-mask seed share (peer survived) or the mask-key share (peer
  dropped), never both, and only once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableSet

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedse_secure.secagg.base import MessageRejected
from fedse_secure.secagg.encoding import check_update
from fedse_secure.secagg.masking import keys, shamir
from fedse_secure.secagg.masking.errors import (
    AuthenticationError,
    InvalidUpdateError,
    PeerMisbehaviourError,
    ProtocolError,
    RoundAbortedError,
    SecureAggregationError,
    UnsafeSetupError,
)
from fedse_secure.secagg.masking.graph import graph_seed, neighbour_sets, roster_digest
from fedse_secure.secagg.masking.identity import IdentityKey, PublicKeyRegistry
from fedse_secure.secagg.masking.messages import (
    NEXT_PHASE,
    REQUESTS,
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
    UnmaskRequest,
    UnmaskShares,
    commitments_payload,
    masked_input_header,
    survivors_payload,
)
from fedse_secure.secagg.masking.prg import InputTag, MaskApplier, MaskStream, RandomSource
from fedse_secure.secagg.masking.quantize import RING_DTYPES, ChunkQuantiser, required_ring_bits
from fedse_secure.secagg.masking.requirements import MaskingRequirements
from fedse_secure.secagg.masking.settings import MaskingSettings

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
        requirements: MaskingRequirements | None = None,
        vector: np.ndarray | None = None,
        rng: RandomSource | None = None,
        aead: Callable[[bytes], AESGCM] = AESGCM,
        answered: MutableSet[bytes] | None = None,
    ) -> None:
        self.name = name
        self.identity = identity
        self.registry = registry
        self.config = config or MaskingSettings()
        # The institution's own floor for the protocol; never taken from the coordinator's setup.
        self.requirements = requirements or self.config.requirements()
        # The share cipher, injected so a threat check can swap in a broken one without patching this module.
        self.aead = aead
        self.rng = rng or RandomSource()
        # Setup digests this institution has answered (shared by its machines of earlier rounds).
        self.answered = answered if answered is not None else set()
        self.phase: Phase = Phase.ADVERTISE_KEYS
        self.round_id: int | None = None
        self.abort_reason: str | None = None
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
        return self.phase is Phase.DONE

    @property
    def aborted(self) -> bool:
        return self.phase is Phase.ABORTED

    def handle(self, msg: ProtocolMessage) -> ProtocolMessage:
        """The reply to one request; see the module docstring for the two kinds of error."""
        if self.phase is Phase.ABORTED:
            raise RoundAbortedError(f"{self.name}: round {self.round_id} was aborted ({self.abort_reason}); a "
                                    f"{type(msg).__name__} gets no answer")
        if self.phase is Phase.DONE:
            raise ProtocolError(f"{self.name}: round {self.round_id} is done; a {type(msg).__name__} is refused "
                                "(a client unmasks once per round)")
        if not isinstance(msg, REQUESTS[self.phase]):
            raise ProtocolError(f"{self.name}: got a {type(msg).__name__} ({getattr(msg, 'STAGE', '?')}) while "
                                f"expecting the {self.phase} request; stages must come in order")
        if self.phase is not Phase.ADVERTISE_KEYS and msg.round_id != self.round_id:
            raise ProtocolError(f"{self.name}: message for round {msg.round_id} during round {self.round_id}; "
                                "stale or replayed, rejected")
        handler = getattr(self, f"_on_{self.phase}")
        try:
            reply = handler(msg)
        except MessageRejected as err:
            # Past the checks above, the handler may have changed state: whatever it found, the round is over.
            self._abort(str(err))
            raise PeerMisbehaviourError(str(err)) from None
        except SecureAggregationError as err:
            self._abort(str(err))
            raise
        self.phase = NEXT_PHASE[self.phase]
        return reply

    def _abort(self, reason: str) -> None:
        self.phase = Phase.ABORTED
        self.abort_reason = reason
        # Nothing of the round may outlive the abort.
        self._vector = None
        self._seed = b""
        self._seed_shares, self._key_shares = {}, {}

    def _verify(self, who: str, signature: bytes, payload: bytes, what: str) -> None:
        try:
            self.registry.verify(who, signature, payload, f"{self.name}: {what}")
        except AuthenticationError as err:
            raise PeerMisbehaviourError(str(err)) from None

    # -- stages ---------------------------------------------------------------------------------------------
    def screen(self, msg: ProtocolMessage) -> None:
        """Refuse a setup before any local work is spent on the round (raises :class:`UnsafeSetupError`, or
        :class:`ProtocolError` if ``msg`` is not this round's setup); the machine is unchanged."""
        if self.phase is not Phase.ADVERTISE_KEYS or not isinstance(msg, SetupRequest):
            raise ProtocolError(f"{self.name}: only the setup of a round that has not started can be screened")
        self._check_setup(msg)

    def _check_setup(self, setup: SetupRequest) -> bytes:
        """The setup's digest, or :class:`UnsafeSetupError` naming the parameter that is weaker than this
        institution accepts."""
        names = setup.participants
        n = len(names)

        def refuse(reason: str) -> UnsafeSetupError:
            return UnsafeSetupError(f"{self.name} refuses the setup of round {setup.round_id}: {reason}")

        if self.name not in names:
            raise refuse("participants: the setup does not list this institution")
        if len(set(names)) != n:
            raise refuse("participants: the setup lists an institution twice")
        unknown = [p for p in names if p not in self.registry]
        if unknown:
            raise refuse(f"participants: {unknown[:3]} have no identity key in this institution's registry")
        roster = self.requirements.roster
        outsiders = sorted(p for p in names if roster is not None and p not in roster)
        if outsiders:
            raise refuse(f"participants: {outsiders[:3]} are not institutions of the experiment this institution "
                         "approved")
        reason = self.requirements.refusal(n, n, setup.degree, setup.threshold)
        if reason:
            raise refuse(f"{reason}; the coordinator must propose at least what its institutions require")
        cfg = self.config
        f = cfg.precision(n)
        if (setup.clip_range, setup.fractional_bits) != (cfg.clip_range, f):
            raise refuse(f"clip_range/fractional_bits: the setup asks for {setup.clip_range}/{setup.fractional_bits}, "
                         f"this institution uses {cfg.clip_range}/{f} for {n} participants; use the same settings")
        if setup.ring_bits not in RING_DTYPES or setup.ring_bits < required_ring_bits(n, cfg.clip_range, f):
            raise refuse(f"ring_bits: a {setup.ring_bits}-bit ring can overflow for {n} institutions")
        if setup.vector_len < 0:
            raise refuse("vector_len: negative")
        if len(setup.nonce) != 32 or len(setup.server_key) != 32:
            raise refuse("nonce/server_key: the setup lacks a fresh 32-byte nonce or the coordinator's key")
        digest = setup.digest()
        if digest in self.answered:
            raise refuse("nonce: this institution already answered a setup with this digest; a replayed setup is "
                         "refused")
        return digest

    def _on_advertise_keys(self, setup: SetupRequest) -> KeyAdvertisement:
        self.round_id = setup.round_id
        digest = self._check_setup(setup)
        self.answered.add(digest)
        names = setup.participants
        self.setup, self.digest = setup, digest
        self.index = {p: i + 1 for i, p in enumerate(sorted(names))}
        self._mask_key = keys.new_x25519(self.rng)
        self._enc_key = keys.new_x25519(self.rng)
        self._seed = self.rng.bytes(32)
        advert = KeyAdvertisement(
            round_id=setup.round_id,
            sender=self.name,
            mask_public_key=keys.x25519_public_bytes(self._mask_key),
            enc_public_key=keys.x25519_public_bytes(self._enc_key),
            seed_commitment=keys.seed_commitment(self._seed, digest, self.name),
        )
        advert.signature = self.identity.sign(advert.signed_payload(digest))
        self._advert = advert
        return advert

    def _on_share_keys(self, msg: KeysBroadcast) -> EncryptedShares:
        adverts: dict[str, KeyAdvertisement] = {}
        for a in msg.adverts:
            if a.sender not in self.index:
                raise PeerMisbehaviourError(f"{self.name}: the roster holds keys of {a.sender!r}, who is not a "
                                            "participant; refusing")
            if a.sender in adverts:
                raise PeerMisbehaviourError(f"{self.name}: duplicate key advertisement from {a.sender!r}; refusing")
            if a.round_id != self.round_id:
                raise PeerMisbehaviourError(f"{self.name}: key advertisement of {a.sender!r} is for round "
                                            f"{a.round_id}; replay rejected")
            # Every advertisement, not only the neighbours': the graph is drawn from all of them.
            self._verify(a.sender, a.signature, a.signed_payload(self.digest), "key advertisement")
            adverts[a.sender] = a
        if adverts.get(self.name) != self._advert:
            raise PeerMisbehaviourError(f"{self.name}: the coordinator did not return this institution's own keys "
                                        "unchanged; refusing")
        pubs = [k for a in adverts.values() for k in (a.mask_public_key, a.enc_public_key)]
        if len(set(pubs)) != len(pubs):
            raise PeerMisbehaviourError(f"{self.name}: two advertised public keys are identical; refusing")
        s = self.setup
        reason = self.requirements.refusal(len(s.participants), len(adverts), s.degree, s.threshold)
        if reason:
            raise UnsafeSetupError(f"{self.name} refuses round {self.round_id} once {len(adverts)} of "
                                   f"{len(s.participants)} institutions advertised keys: {reason}")
        self.session = roster_digest(self.digest, list(adverts.values()))
        self.members = frozenset(adverts)
        self.neighbours = neighbour_sets(sorted(adverts), s.degree, graph_seed(self.session))[self.name]
        self.neighbourhood = self.neighbours | {self.name}
        self.adverts = adverts
        try:
            self._tag_key = keys.input_tag_key(self._enc_key, s.server_key, self.session, self.name)
        except ValueError:
            raise PeerMisbehaviourError(f"{self.name}: the coordinator's setup key is a low-order point; refusing") from None
        holders = sorted(self.neighbourhood)
        xs = [self.index[h] for h in holders]
        seed_shares = shamir.split(self._seed, s.threshold, xs, self.rng)
        key_shares = shamir.split(keys.x25519_private_bytes(self._mask_key), s.threshold, xs, self.rng)
        commitments = {
            h: keys.share_commitment(self.session, self.name, h, "seed", seed_shares[self.index[h]])
            + keys.share_commitment(self.session, self.name, h, "key", key_shares[self.index[h]])
            for h in holders
        }
        self._seed_shares = {self.name: seed_shares[self.index[self.name]]}
        self._key_shares = {self.name: key_shares[self.index[self.name]]}
        self._enc_keys: dict[str, bytes] = {}
        out = {}
        for peer in holders:
            if peer == self.name:
                continue
            try:
                k = keys.share_encryption_key(self._enc_key, adverts[peer].enc_public_key, self.session, self.name,
                                              peer)
            except ValueError:
                raise PeerMisbehaviourError(f"{self.name}: {peer!r} advertised a low-order encryption key; "
                                            "refusing") from None
            self._enc_keys[peer] = k
            nonce = self.rng.bytes(_NONCE)
            pt = seed_shares[self.index[peer]] + key_shares[self.index[peer]]
            aad = keys.share_aad(self.session, self.round_id, self.name, peer)
            out[peer] = nonce + self.aead(k).encrypt(nonce, pt, aad)
        signature = self.identity.sign(commitments_payload(self.session, self.round_id, self.name, commitments))
        return EncryptedShares(round_id=self.round_id, sender=self.name, ciphertexts=out, commitments=commitments,
                               signature=signature)

    def _on_masked_input(self, msg: MaskedInputRequest) -> MaskedInput:
        for sender, ct in msg.ciphertexts.items():
            k = self._enc_keys.get(sender)
            if k is None:
                raise PeerMisbehaviourError(f"{self.name}: got shares from {sender!r}, which is not a neighbour; "
                                            "refusing")
            aad = keys.share_aad(self.session, self.round_id, sender, self.name)
            try:
                pt = self.aead(k).decrypt(ct[:_NONCE], ct[_NONCE:], aad)
            except (InvalidTag, ValueError):
                raise PeerMisbehaviourError(
                    f"{self.name}: the shares from {sender!r} fail AES-GCM authentication (tampered, replayed from "
                    "another round, or addressed to another client); refusing"
                ) from None
            seed_share, key_share = pt[: shamir.SHARE_BYTES], pt[shamir.SHARE_BYTES :]
            if (len(key_share) != shamir.SHARE_BYTES or shamir.share_x(seed_share) != self.index[self.name]
                    or shamir.share_x(key_share) != self.index[self.name]):
                raise PeerMisbehaviourError(f"{self.name}: the shares from {sender!r} are not for this client; "
                                            "refusing")
            self._seed_shares[sender] = seed_share
            self._key_shares[sender] = key_share
        self.shared_with = frozenset(self._seed_shares)  # neighbours that finished share_keys, and itself
        if len(self.shared_with) < self.setup.threshold:
            raise RoundAbortedError(
                f"{self.name}: only {len(self.shared_with)} of its neighbourhood shared keys, threshold is "
                f"{self.setup.threshold}; the round cannot complete"
            )
        if self._vector is None:
            raise InvalidUpdateError(f"{self.name}: no update to mask; call set_input() before the masked_input stage")
        x = check_update(self.name, self._vector, self.setup.vector_len)
        t0, c0 = time.perf_counter(), time.thread_time()
        bits = self.setup.ring_bits
        dtype = RING_DTYPES[bits]
        streams = [MaskStream(keys.self_mask_key(self._seed, self.session), dtype, +1)]
        for peer in sorted(self.shared_with - {self.name}):
            try:
                k = keys.pair_mask_key(self._mask_key, self.adverts[peer].mask_public_key, self.session, self.name,
                                       peer)
            except ValueError:
                raise PeerMisbehaviourError(f"{self.name}: {peer!r} advertised a low-order mask key; refusing") from None
            # Each pair's mask enters once with + and once with -, so it cancels in the sum.
            streams.append(MaskStream(k, dtype, +1 if self.name < peer else -1))
        size = x.size + 1  # + the clipped count, summed under the masks too
        wire, out, tag_view = MaskedInput.allocate(self.round_id, self.name, size, dtype)
        quant = ChunkQuantiser(x, self.setup.clip_range, self.setup.fractional_bits, bits, self.name,
                               refuse=self.config.on_out_of_range == "refuse")
        tag = InputTag(self._tag_key, masked_input_header(self.session, self.round_id, self.name, size))
        applier = MaskApplier(dtype)
        applier.apply(out, streams, before_chunk=quant, after_chunk=lambda start, chunk: tag.update(chunk))
        tag_view[:TAG_BYTES] = tag.tag()
        self.values_clipped = quant.values_clipped
        self.keystream_bytes = applier.keystream_bytes
        self.mask_seconds = time.perf_counter() - t0
        self.mask_cpu_seconds = time.thread_time() - c0
        self._vector = None
        # The secrets behind this round's masks now live only as shares held by the neighbours.
        self._seed = b""
        return MaskedInput.prebuilt(wire, self.round_id, self.name, out, bytes(tag_view))

    def _on_consistency(self, msg: ConsistencyRequest) -> ConsistencySignature:
        survivors = list(msg.survivors)
        s = set(survivors)
        if len(s) != len(survivors) or not s <= self.members:
            raise PeerMisbehaviourError(f"{self.name}: the survivor list has duplicates or names outside the "
                                        "roster; refusing to sign")
        if self.name not in s:
            raise PeerMisbehaviourError(
                f"{self.name}: the coordinator lists this institution as dropped although it sent its masked input; "
                "refusing to sign (a coordinator doing this is after its mask key)"
            )
        if not (s & self.neighbours) <= self.shared_with:
            raise PeerMisbehaviourError(f"{self.name}: the survivor list names neighbours that never shared keys; "
                                        "refusing to sign")
        alive = len(s & self.shared_with)
        if alive < self.setup.threshold:
            raise RoundAbortedError(
                f"{self.name}: only {alive} of its neighbourhood survived, threshold is {self.setup.threshold}; "
                "the round is abandoned"
            )
        self.survivors = sorted(survivors)
        sig = self.identity.sign(survivors_payload(self.session, self.round_id, self.survivors))
        return ConsistencySignature(round_id=self.round_id, sender=self.name, signature=sig)

    def _on_unmask(self, msg: UnmaskRequest) -> UnmaskShares:
        if sorted(msg.survivors) != self.survivors:
            raise PeerMisbehaviourError(
                f"{self.name}: the unmask request's survivor list differs from the one this institution signed; the "
                "coordinator is equivocating; refusing to release any share"
            )
        payload = survivors_payload(self.session, self.round_id, self.survivors)
        surv = set(self.survivors)
        signed_by = set()
        for signer, sig in msg.signatures.items():
            if signer not in surv:
                raise PeerMisbehaviourError(
                    f"{self.name}: {signer!r} signed the survivor list but is listed as dropped; the coordinator is "
                    "trying to obtain a live institution's mask key; refusing"
                )
            self._verify(signer, sig, payload, "survivor-list signature")
            signed_by.add(signer)
        if self.name not in signed_by:
            raise PeerMisbehaviourError(f"{self.name}: the unmask request lacks this institution's own signature; "
                                        "refusing")
        enough = len(signed_by & self.neighbourhood)
        if enough < self.setup.threshold:
            raise PeerMisbehaviourError(
                f"{self.name}: only {enough} of its neighbourhood signed the survivor list, threshold is "
                f"{self.setup.threshold}; refusing to release shares"
            )
        seed_out, key_out = {}, {}
        for peer in sorted(self.shared_with):
            kind = "seed" if peer in surv else "key"
            if self._revealed.setdefault(peer, kind) != kind:
                raise PeerMisbehaviourError(f"{self.name}: refusing to reveal both shares for {peer!r}")
            if kind == "seed":
                seed_out[peer] = self._seed_shares[peer]
            else:
                key_out[peer] = self._key_shares[peer]
        # The shares are no longer needed; drop the secrets so a later request cannot extract anything.
        self._seed_shares, self._key_shares = {}, {}
        return UnmaskShares(round_id=self.round_id, sender=self.name, seed_shares=seed_out, key_shares=key_out)
