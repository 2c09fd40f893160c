"""Threat checks on secure aggregation: T1 a curious coordinator, T3 a coordinator lying about dropouts, T4 key
substitution (a man in the middle), T5 tampered and replayed messages, T6 collusion below the threshold.
Each runs a real attack on the real masking backend (``fedse_threat_model.attacks`` has the machinery)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedse_threat_model.attacks import (
    NAMES,
    Federation,
    coordinator_view,
    masking_backend,
    on_messages,
    round_to_consistency,
    strip_pair_masks,
    strip_self_mask,
)
from fedse_threat_model.harness import CheckResult, ProtectionSettings, check, correlation, rel_err, rounded, updates


# ======================================================================================================
# T1: a curious coordinator recovers one institution's update from what it receives
# ======================================================================================================

@check
def curious_coordinator_view(settings: ProtectionSettings) -> CheckResult:
    """The coordinator follows the protocol but keeps every message it receives and tries to read each
    institution's update out of them. Pass: nothing it holds correlates with any individual update."""
    size = 20_000
    xs = updates(NAMES, size, settings.seed)
    result, estimates, counts = coordinator_view(settings, xs, settings.seed)
    true_sum = sum(xs.values())
    corr = {p: correlation(estimates[p], xs[p]) for p in NAMES}
    rel = {p: rel_err(estimates[p], xs[p]) for p in NAMES}
    worst = max(abs(c) for c in corr.values())
    # 1/sqrt(size) = 0.007 is the spread of the correlation of independent vectors; 0.05 is 7 of those.
    limit = 0.05
    passed = worst < limit and min(rel.values()) > 0.5
    sum_corr = float(np.mean([correlation(result.total, xs[p]) for p in NAMES]))
    evidence = {
        "institutions": len(NAMES), "update_size": size, "secure_aggregation": settings.secure_aggregation,
        "max_abs_corr_view_vs_update": rounded(worst), "corr_limit": limit,
        "min_relative_error_of_recovery": rounded(min(rel.values())),
        "sum_is_correct_max_abs_err": float(np.max(np.abs(result.total - true_sum))),
        "residual_corr_released_sum_vs_each_update": rounded(sum_corr),
        "messages_seen_by_coordinator": counts["messages_seen"],
    }
    summary = (
        f"best per-institution estimate: |corr| {worst:.3f} with the true update (limit {limit}), relative "
        f"error {min(rel.values()):.2f}; the released sum still correlates {sum_corr:.2f} with each update"
    )
    return CheckResult(passed, summary, evidence)


# ======================================================================================================
# T3: a malicious coordinator lies about dropouts to unmask a live institution
# ======================================================================================================

@check
def lying_about_dropouts(settings: ProtectionSettings) -> CheckResult:
    """The coordinator has inst2's masked input, tells the others that inst2 dropped (to get shares of its
    mask key), then claims it is alive after all (to get shares of its self-mask seed). Pass: it never holds
    both, so inst2's update stays masked."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from fedse_secure.secagg.masking import (
        ConsistencyRequest,
        ProtocolError,
        SecureAggregationError,
        UnmaskRequest,
        keys,
        shamir,
    )
    from fedse_secure.secagg.masking.quantize import dequantise

    victim, size = "inst2", 4096
    if not settings.on("masking"):
        xs = updates(NAMES, size, settings.seed)
        _result, view, _ = coordinator_view(settings, xs, settings.seed)
        err = rel_err(view[victim], xs[victim])
        return CheckResult(False, f"no masking: the coordinator holds {victim}'s update outright (error {err:.0e})",
                           {"secure_aggregation": "none", "relative_error_of_recovery": err})
    cfg, server, clients, xs, masked = round_to_consistency(settings, size, settings.seed, consistency=True)
    others = [p for p in NAMES if p != victim]
    evidence: dict[str, Any] = {"threshold": server.threshold, "institutions": len(NAMES), "victim": victim}
    # Step 1: the victim itself is asked to sign a list without it.
    try:
        clients[victim].handle(ConsistencyRequest(round_id=1, survivors=others))
        evidence["victim_signed_list_without_itself"] = True
    except ProtocolError:
        evidence["victim_signed_list_without_itself"] = False
    # Step 2: everyone else is told the victim dropped; their shares of its mask key come back.
    sigs = {p: clients[p].handle(ConsistencyRequest(round_id=1, survivors=others)).signature for p in others}
    first = {p: clients[p].handle(UnmaskRequest(round_id=1, survivors=others, signatures=sigs)) for p in others}
    key_shares = [r.key_shares[victim] for r in first.values() if victim in r.key_shares]
    sk = X25519PrivateKey.from_private_bytes(shamir.combine(key_shares, server.threshold))
    y = strip_pair_masks(masked[victim], victim, sk, server, others)
    # Step 3: now the victim is "alive": ask again, this time for shares of its self-mask seed.
    victim_sig = None
    try:
        victim_sig = clients[victim].handle(ConsistencyRequest(round_id=1, survivors=NAMES)).signature
    except ProtocolError:
        pass
    sigs_all = {**sigs, **({victim: victim_sig} if victim_sig else {})}
    seed_shares, refusals = [], 0
    for p in others:
        try:
            reply = clients[p].handle(UnmaskRequest(round_id=1, survivors=NAMES, signatures=sigs_all))
            if victim in reply.seed_shares:
                seed_shares.append(reply.seed_shares[victim])
        except (ProtocolError, SecureAggregationError):
            refusals += 1
    evidence.update(mask_key_shares_obtained=len(key_shares), seed_shares_obtained=len(seed_shares),
                    second_requests_refused=refusals)
    recovered = False
    if len(seed_shares) >= server.threshold:
        seed = shamir.combine(seed_shares, server.threshold)
        if keys.seed_commitment(seed, server.digest, victim) == server.adverts[victim].seed_commitment:
            y = strip_self_mask(y, seed, server.digest)
            recovered = True
    est = dequantise(y, cfg.fractional_bits)[:size]
    corr, err = correlation(est, xs[victim]), rel_err(est, xs[victim])
    evidence.update(corr_estimate_vs_update=rounded(corr), relative_error_of_recovery=rounded(err, 6),
                    both_secrets_reconstructed=recovered)
    passed = not recovered and abs(corr) < 0.1
    if passed:
        summary = (f"got {len(key_shares)} mask-key shares but {len(seed_shares)} seed shares ({refusals} "
                   f"refusals); the stripped vector still has |corr| {abs(corr):.3f} with the update")
    else:
        summary = (f"both secrets of {victim} reconstructed ({len(key_shares)} key + {len(seed_shares)} seed "
                   f"shares): update recovered with relative error {err:.1e}")
    return CheckResult(passed, summary, evidence)


# ======================================================================================================
# T4: the coordinator (or anyone on the path) substitutes the key advertisements: a man in the middle
# ======================================================================================================

@check
def key_substitution(settings: ProtectionSettings) -> CheckResult:
    """The coordinator replaces every peer's advertised X25519 keys with its own in what it forwards to the
    victim, so the victim encrypts its Shamir shares to the coordinator and masks with coordinator-known keys.
    Pass: the victim refuses the forged advertisements (signatures do not verify) and sends nothing."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from fedse_secure.secagg.masking import AuthenticationError, KeysBroadcast, MaskedInputRequest, decode, keys, shamir
    from fedse_secure.secagg.masking.prg import RandomSource
    from fedse_secure.secagg.masking.quantize import dequantise

    victim, size = "inst3", 4096
    if not settings.on("masking"):
        xs = updates(NAMES, size, settings.seed)
        _result, view, _ = coordinator_view(settings, xs, settings.seed)
        return CheckResult(False, f"no masking: the coordinator receives {victim}'s update without any key exchange",
                           {"secure_aggregation": "none", "relative_error_of_recovery": rel_err(view[victim], xs[victim])})
    backend = masking_backend(settings)
    cfg = backend.settings
    xs = updates(NAMES, size, settings.seed)
    server_machine, client_machines = Federation(settings, backend, settings.seed).machines(1, size, xs)
    server, clients = server_machine.machine, {p: c.machine for p, c in client_machines.items()}
    evil = RandomSource.seeded(settings.seed, "key-substitution").child("attacker")
    setup = server.start()
    adverts = {p: clients[p].handle(decode(setup[p].to_bytes())) for p in NAMES}
    digest = server.digest
    atk_mask = {p: keys.new_x25519(evil) for p in NAMES if p != victim}
    atk_enc = {p: keys.new_x25519(evil) for p in NAMES if p != victim}
    forged = []
    for p in NAMES:
        a = decode(adverts[p].to_bytes())
        if p != victim:  # keep the genuine signature: the attacker cannot make a new one
            a.mask_public_key = keys.x25519_public_bytes(atk_mask[p])
            a.enc_public_key = keys.x25519_public_bytes(atk_enc[p])
        forged.append(a)
    evidence: dict[str, Any] = {"victim": victim, "signatures_verified": settings.on("signatures")}
    try:
        shares_msg = clients[victim].handle(KeysBroadcast(round_id=1, adverts=forged))
    except AuthenticationError as err:
        evidence.update(forgery_refused=True, refusal=str(err)[:160], shares_leaked=0)
        who = str(err).split("the signature of ")[-1].split(" does not")[0]
        return CheckResult(True, f"victim refused the substituted keys before sending anything (signature of {who} "
                                 "does not verify against the registry)", evidence)
    # The victim accepted: decrypt its shares, reconstruct its secrets, then have it mask its update.
    victim_adv = adverts[victim]
    seed_shares, key_shares = [], []
    for peer, ct in shares_msg.ciphertexts.items():
        k = keys.share_encryption_key(atk_enc[peer], victim_adv.enc_public_key, digest, victim, peer)
        pt = AESGCM(k).decrypt(ct[:12], ct[12:], keys.share_aad(digest, 1, victim, peer))
        seed_shares.append(pt[: shamir.SHARE_BYTES])
        key_shares.append(pt[shamir.SHARE_BYTES:])
    seed = shamir.combine(seed_shares, server.threshold)
    index = {p: i + 1 for i, p in enumerate(sorted(NAMES))}
    fake = {}
    for peer in atk_enc:  # well-formed shares for the victim's index, so it goes on to mask its update
        junk = shamir.split(evil.bytes(32), 1, [index[victim]], evil)[index[victim]]
        k = keys.share_encryption_key(atk_enc[peer], victim_adv.enc_public_key, digest, peer, victim)
        nonce = evil.bytes(12)
        fake[peer] = nonce + AESGCM(k).encrypt(nonce, junk + junk, keys.share_aad(digest, 1, peer, victim))
    y = clients[victim].handle(MaskedInputRequest(round_id=1, ciphertexts=fake)).vector
    from fedse_secure.secagg.masking.prg import MaskApplier, MaskStream

    y = strip_self_mask(y, seed, digest)
    streams = []
    for peer in sorted(atk_mask):
        k = keys.pair_mask_key(atk_mask[peer], victim_adv.mask_public_key, digest, victim, peer)
        streams.append(MaskStream(k, y.dtype, -1 if victim < peer else +1))
    MaskApplier(y.dtype).apply(y, streams)
    est = dequantise(y, cfg.fractional_bits)[:size]
    err = float(np.max(np.abs(est - xs[victim])))
    evidence.update(forgery_refused=False, shares_leaked=len(seed_shares), max_abs_error_of_recovery=err)
    return CheckResult(False, f"victim accepted forged keys: update recovered exactly (max error {err:.1e})", evidence)


# ======================================================================================================
# T5: tampered, replayed and misdirected protocol messages
# ======================================================================================================

@check
def tamper_and_replay(settings: ProtectionSettings) -> CheckResult:
    """A network attacker or the coordinator alters messages in flight. Pass: each altered message is rejected
    where it arrives (before it can influence anything), naming the sender."""
    from fedse_secure.secagg.masking import (
        EncryptedShares,
        KeysBroadcast,
        MaskedInputRequest,
        ProtocolError,
        SecureAggregationError,
        Stage,
        UnmaskShares,
        decode,
    )

    if not settings.on("masking"):
        # The plaintext path has no protocol messages to authenticate: a changed update enters the sum as is.
        xs = updates(NAMES[:3], 512, settings.seed)
        forged = dict(xs)
        forged["inst0"] = xs["inst0"] + 1.0
        _result, _view, _ = coordinator_view(settings, forged, settings.seed)
        return CheckResult(False, "no masking: a modified update is summed without any authentication",
                           {"secure_aggregation": "none", "modified_update_accepted": True})
    outcomes: dict[str, str] = {}
    xs = updates(NAMES, 256, settings.seed)

    true_sum = sum(xs.values())

    def attempt(label: str, fed, round_id: int, interceptor, expect: str, robust_ok: bool = False) -> None:
        try:
            result = fed.aggregate(round_id, xs, on_messages(interceptor))
            exact = float(np.max(np.abs(result.total - true_sum))) < 1e-5
            if robust_ok and exact:
                # The server reconstructs from another t shares that match the signed commitment.
                outcomes[label] = "rejected: the corrupted share was outvoted; the sum is exact"
            else:
                outcomes[label] = "accepted: round completed" + ("" if exact else " with a WRONG sum")
        except SecureAggregationError as err:
            text = str(err)
            outcomes[label] = ("rejected: " if expect in text else "accepted, failed later: ") + text[:140]

    # (a) one bit of an encrypted share flipped on its way to inst1.
    def tamper(stage, direction, name, msg):
        if stage == Stage.MASKED_INPUT and direction == "to_client" and name == "inst1":
            ct = dict(msg.ciphertexts)
            c = bytearray(ct["inst0"])
            c[20] ^= 1
            ct["inst0"] = bytes(c)
            return MaskedInputRequest(round_id=msg.round_id, ciphertexts=ct)
        return None

    fed = Federation(settings, masking_backend(settings, aead=True), settings.seed + 1)
    attempt("tampered_share", fed, 1, tamper, "shares from 'inst0' fail AES-GCM")

    # (b) inst0's share for inst1 delivered to inst2 instead.
    def misdirect(stage, direction, name, msg):
        if stage == Stage.SHARE_KEYS and direction == "to_server" and name == "inst0":
            cts = dict(msg.ciphertexts)
            cts["inst2"] = cts["inst1"]
            return EncryptedShares(round_id=msg.round_id, sender="inst0", ciphertexts=cts)
        return None

    attempt("misdirected_share", fed, 2, misdirect, "inst2: the shares from 'inst0'")

    # (c) a share and a signed key advertisement recorded in round 3 replayed in round 4.
    captured: dict[str, Any] = {}

    def capture(stage, direction, name, msg):
        if stage == Stage.SHARE_KEYS and direction == "to_server" and name == "inst0":
            captured["share"] = msg.ciphertexts["inst1"]
        if stage == Stage.SHARE_KEYS and direction == "to_client" and name == "inst3":
            captured["advert"] = decode(next(a for a in msg.adverts if a.sender == "inst1").to_bytes())
        return None

    fed.aggregate(3, xs, on_messages(capture))

    def replay_share(stage, direction, name, msg):
        if stage == Stage.MASKED_INPUT and direction == "to_client" and name == "inst1":
            return MaskedInputRequest(round_id=msg.round_id, ciphertexts={**msg.ciphertexts, "inst0": captured["share"]})
        return None

    attempt("replayed_share_from_earlier_round", fed, 4, replay_share, "shares from 'inst0' fail AES-GCM")

    def replay_advert(stage, direction, name, msg):
        if stage == Stage.SHARE_KEYS and direction == "to_client" and name == "inst3":
            old = decode(captured["advert"].to_bytes())
            old.round_id = msg.round_id  # relabelled, or the round check alone would catch it
            return KeysBroadcast(round_id=msg.round_id,
                                 adverts=[old if a.sender == "inst1" else a for a in msg.adverts])
        return None

    attempt("replayed_signed_key_advertisement", fed, 5, replay_advert, "signature of 'inst1' does not verify")

    # (d) a corrupted share in the unmask stage (caught by the signed seed commitment).
    def tamper_unmask(stage, direction, name, msg):
        if stage == Stage.UNMASK and direction == "to_server" and name == "inst0":
            seed = {k: v[:-1] + bytes([v[-1] ^ 1]) for k, v in msg.seed_shares.items()}
            return UnmaskShares(round_id=msg.round_id, sender="inst0", seed_shares=seed, key_shares=msg.key_shares)
        return None

    attempt("tampered_unmask_share", fed, 6, tamper_unmask, "match its signed commitment", robust_ok=True)

    # (e) a message from an earlier round delivered to the coordinator.
    server = fed.backend.server(8, NAMES, 256, fed.registry).machine
    server.start()
    try:
        server.receive(decode(captured["advert"].to_bytes()))  # inst1's advertisement from round 3
        outcomes["stale_message_to_coordinator"] = "accepted"
    except ProtocolError as err:
        outcomes["stale_message_to_coordinator"] = "rejected: " + str(err)[:140]

    rejected = {k: v.startswith("rejected") for k, v in outcomes.items()}
    passed = all(rejected.values())
    bad = [k for k, ok in rejected.items() if not ok]
    summary = (f"{sum(rejected.values())}/{len(rejected)} altered messages rejected on arrival"
               + ("" if passed else f"; accepted: {', '.join(bad)}"))
    return CheckResult(passed, summary, {"outcomes": outcomes, "aead": settings.on("aead"),
                                         "signatures": settings.on("signatures")})


# ======================================================================================================
# T6: up to t-1 institutions collude with the coordinator against one honest institution
# ======================================================================================================

@check
def collusion_below_threshold(settings: ProtectionSettings) -> CheckResult:
    """t-1 institutions pool their decrypted shares and their own mask keys with the coordinator, which holds
    the victim's masked input. Pass: the victim's seed cannot be reconstructed and the stripped vector carries
    no trace of the update. Evidence also shows that t colluders would succeed (the trust assumption)."""
    from fedse_secure.secagg.masking import SecureAggregationError, keys, shamir
    from fedse_secure.secagg.masking.quantize import dequantise

    victim, size = "inst0", 4096
    if not settings.on("masking"):
        xs = updates(NAMES, size, settings.seed)
        _result, view, _ = coordinator_view(settings, xs, settings.seed)
        return CheckResult(False, "no masking: the coordinator alone holds every update",
                           {"secure_aggregation": "none", "relative_error_of_recovery": rel_err(view[victim], xs[victim])})
    cfg, server, clients, xs, masked = round_to_consistency(settings, size, settings.seed)
    t = server.threshold
    colluders = [p for p in NAMES if p != victim][: t - 1]
    honest_rest = [p for p in NAMES if p not in colluders and p != victim]
    commitment = server.adverts[victim].seed_commitment

    def seed_from(group) -> bool:
        shares = [clients[c]._seed_shares[victim] for c in group]
        try:
            seed = shamir.combine(shares, len(shares))
        except SecureAggregationError:
            return False
        return keys.seed_commitment(seed, server.digest, victim) == commitment

    below = seed_from(colluders)
    at_threshold = seed_from([p for p in NAMES if p != victim][:t])
    # What the coalition can strip: the victim's pairwise masks with each colluder (each knows its own key).
    from fedse_secure.secagg.masking.prg import MaskApplier, MaskStream

    y = masked[victim].copy()
    streams = []
    for c in colluders:
        k = keys.pair_mask_key(clients[c]._mask_key, server.adverts[victim].mask_public_key, server.digest, c, victim)
        streams.append(MaskStream(k, y.dtype, -1 if victim < c else +1))
    MaskApplier(y.dtype).apply(y, streams)
    est = dequantise(y, cfg.fractional_bits)[:size]
    corr = correlation(est, xs[victim])
    # The residual the protocol does not remove: the sum minus the colluders' own updates.
    honest_sum = xs[victim] + sum(xs[p] for p in honest_rest)
    residual_corr = correlation(honest_sum, xs[victim])
    passed = not below and abs(corr) < 0.1
    evidence = {
        "threshold": t, "colluding_institutions": len(colluders), "seed_reconstructed_by_t_minus_1": below,
        "seed_reconstructed_by_t_colluders": at_threshold, "corr_stripped_vector_vs_update": rounded(corr),
        "honest_institutions_left_in_sum": 1 + len(honest_rest),
        "residual_corr_sum_minus_colluders_vs_update": rounded(residual_corr),
    }
    summary = (f"{len(colluders)} colluders + coordinator: seed not reconstructed, |corr| {abs(corr):.3f}; "
               f"{t} colluders would reconstruct it: {at_threshold}; sum minus colluders still correlates "
               f"{residual_corr:.2f}")
    if not passed:
        summary = f"{len(colluders)} colluders recovered the victim's self-mask seed or update"
    return CheckResult(passed, summary, evidence)
