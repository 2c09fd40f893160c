"""Threat checks on differential privacy and its records: T8 colluders remove their client-level noise shares,
T9 the privacy ledger is edited, T10 the coordinator schedules rounds beyond an institution's budget."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np

from fedse_threat_model.harness import CheckResult, ProtectionSettings, check, rounded

# ======================================================================================================
# T8: colluding institutions remove their own client-level DP noise shares from the sum
# ======================================================================================================

@check
def client_dp_noise_under_collusion(settings: ProtectionSettings) -> CheckResult:
    """Client-level DP adds the Gaussian noise in shares. Colluders (and the coordinator) can subtract their
    own shares from the sum. Pass: with as many colluders as ``honest_fraction`` allows, the noise left in the
    sum still has std >= sigma*C (within sampling error), so the stated epsilon holds."""
    from fedse_secure.config import PrivacyConfig
    from fedse_secure.privacy import privatize_update

    n, honest_fraction, sigma, c = 5, 0.6, 1.0, 1.0
    honest = math.ceil(n * honest_fraction)
    dim, trials = 4000, 8
    privacy = PrivacyConfig(mode="client-dp", noise_multiplier=sigma, max_grad_norm=c, honest_fraction=honest_fraction)
    rng = np.random.default_rng(settings.seed)
    residual = []
    for _ in range(trials):
        noise_left = np.zeros(dim)
        for i in range(n):
            u = rng.normal(0, 0.01, dim)
            if settings.on("dp"):
                noisy, _info = privatize_update(u, privacy, n, np.random.default_rng(rng.integers(2**63)))
            else:
                noisy = u
            if i < honest:  # colluders subtract their own noise; only the honest shares stay
                noise_left += noisy - u * min(1.0, c / max(np.linalg.norm(u), 1e-30))
        residual.append(noise_left)
    std = float(np.std(np.concatenate(residual)))
    # Sampling error of a std from 32000 normal draws is about 0.4%; 3% leaves a wide margin.
    passed = std >= 0.97 * sigma * c
    beyond = sigma * c * math.sqrt((honest - 1) / (n * honest_fraction))
    evidence = {"institutions": n, "honest_fraction": honest_fraction, "colluders": n - honest,
                "target_sum_noise_std": sigma * c, "measured_sum_noise_std_after_collusion": rounded(std),
                "std_if_one_more_colluder": rounded(beyond), "dp": settings.on("dp")}
    summary = (f"{n - honest} colluders removed their shares: noise std in the sum {std:.3f} vs required "
               f"{sigma * c:.2f} (one colluder more than assumed would leave {beyond:.3f})")
    return CheckResult(passed, summary, evidence)


# ======================================================================================================
# T9: the privacy ledger is edited to hide spent budget
# ======================================================================================================

def _naive_events(path: Path):
    from fedse_secure.privacy import DpEvent

    return [DpEvent.from_dict(json.loads(line)["event"]) for line in path.read_text().splitlines() if line.strip()]


@check
def ledger_tampering(settings: ProtectionSettings) -> CheckResult:
    """An institution's operator (or anyone with write access) edits its ledger so that less epsilon appears
    spent. Pass: every edit is detected; the one that rewrites ledger and head consistently is detected against
    the head hash recorded outside the institution."""
    from fedse_secure.privacy import DpEvent, PrivacyLedger, epsilon
    from fedse_secure.audit.chain import canonical as _canonical, record_hash as _entry_hash

    delta = 1e-5
    ev = DpEvent(mechanism="subsampled_gaussian", level="record", noise_multiplier=1.1, sample_rate=0.1, steps=60,
                 clipping_bound=1.0, population=80)
    with tempfile.TemporaryDirectory(prefix="fedse-threat-ledger-") as tmp:
        base = Path(tmp) / "genuine.jsonl"
        ledger = PrivacyLedger(base)
        for r in range(1, 7):
            ledger.append(ev, round=r, institution="inst0", delta=delta)
        external_head = ledger.head_hash()  # what the federation's round log recorded
        true_eps = epsilon(ledger.events(), delta, "rdp")
        lines = base.read_text().splitlines()

        def variant(name: str, new_lines: list[str], head: dict | None = None) -> Path:
            p = Path(tmp) / f"{name}.jsonl"
            p.write_text("".join(line + "\n" for line in new_lines))
            head_src = Path(str(base) + ".head").read_text()
            Path(str(p) + ".head").write_text(json.dumps(head) + "\n" if head else head_src)
            return p

        def edited(rec: dict, rehash: bool) -> str:
            rec = json.loads(json.dumps(rec))
            rec["event"]["noise_multiplier"] = 4.0
            if rehash:
                rec["hash"] = _entry_hash(rec)
            return _canonical(rec).decode()

        recs = [json.loads(x) for x in lines]
        rewritten, prev = [], "0" * 64
        for rec in recs:  # full consistent rewrite: every hash recomputed, head re-sealed
            rec = json.loads(json.dumps(rec))
            rec["event"]["noise_multiplier"] = 4.0
            rec["prev_hash"] = prev
            rec["hash"] = _entry_hash(rec)
            prev = rec["hash"]
            rewritten.append(_canonical(rec).decode())
        old_head = json.loads(Path(str(base) + ".head").read_text())
        attacks = {
            "edit_noise_multiplier": variant("edit", [*lines[:2], edited(recs[2], False), *lines[3:]]),
            "edit_and_rehash_one_line": variant("rehash", [*lines[:2], edited(recs[2], True), *lines[3:]]),
            "delete_middle_entry": variant("delete", [*lines[:2], *lines[3:]]),
            "truncate_last_two": variant("truncate", lines[:-2]),
            "rewrite_ledger_and_head": variant("rewrite", rewritten, {**old_head, "head_hash": prev}),
        }
        outcomes, without_external = {}, {}
        for name, path in attacks.items():
            claimed = epsilon(_naive_events(path), delta, "rdp")
            if settings.on("ledger-chain"):
                report = PrivacyLedger(path).verify(expected_head=external_head)
                detected = not report.ok
                why = report.problem or ""
                without_external[name] = not PrivacyLedger(path).verify().ok
            else:
                detected, why = False, "read as plain JSON lines (no verification)"
            outcomes[name] = {"detected": detected, "claimed_epsilon": rounded(claimed, 3), "why": why[:120]}
    passed = all(o["detected"] for o in outcomes.values())
    missed = [k for k, o in outcomes.items() if not o["detected"]]
    evidence = {"true_epsilon": rounded(true_eps, 3), "attacks": outcomes,
                "detected_without_external_head": without_external or None}
    summary = (f"{sum(o['detected'] for o in outcomes.values())}/{len(outcomes)} ledger edits detected "
               f"(true eps {true_eps:.2f}; edits claim as low as "
               f"{min(o['claimed_epsilon'] for o in outcomes.values()):.2f})"
               + ("" if passed else f"; undetected: {', '.join(missed)}"))
    return CheckResult(passed, summary, evidence)


# ======================================================================================================
# T10: the coordinator keeps scheduling rounds beyond an institution's privacy budget
# ======================================================================================================

@check
def budget_enforcement(settings: ProtectionSettings) -> CheckResult:
    """The coordinator asks for 40 rounds; each costs privacy at the institution. Pass: the institution stops
    at its epsilon budget (the refused round is never trained or recorded), and it also stops when its ledger
    has been tampered with (fail closed)."""
    from fedse_secure.config import PrivacyConfig
    from fedse_secure.privacy import (
        BudgetExceededError,
        BudgetGuard,
        LedgerCorruptedError,
        PrivacyLedger,
        client_event,
        epsilon,
    )

    privacy = PrivacyConfig(mode="client-dp", noise_multiplier=1.0, max_grad_norm=1.0, epsilon_budget=8.0, delta=1e-5)
    event = client_event(privacy, 5)
    with tempfile.TemporaryDirectory(prefix="fedse-threat-budget-") as tmp:
        ledger = PrivacyLedger(Path(tmp) / "ledger.jsonl")
        guard = BudgetGuard(ledger, privacy, institution="inst0")
        trained, refused_at = 0, None
        for r in range(1, 41):
            if settings.on("budget"):
                try:
                    guard.ensure_affordable(event)
                except BudgetExceededError:
                    refused_at = r
                    break
            ledger.append(event, round=r, institution="inst0", delta=privacy.delta)
            trained += 1
        spent = epsilon(ledger.events(), privacy.delta, privacy.accountant)
        entries = len(ledger.entries())
        # Fail closed: a ledger with a deleted line must stop training, not reset the spend to what is left.
        lines = ledger.path.read_text().splitlines()
        ledger.path.write_text("".join(x + "\n" for x in lines[1:]))
        fail_closed = False
        if settings.on("budget"):
            try:
                guard.ensure_affordable(event)
            except (LedgerCorruptedError, BudgetExceededError):
                fail_closed = True
    passed = spent <= privacy.epsilon_budget and refused_at is not None and fail_closed and entries == trained
    evidence = {"budget_epsilon": privacy.epsilon_budget, "rounds_requested": 40, "rounds_run": trained,
                "refused_at_round": refused_at, "epsilon_spent": rounded(spent, 3), "ledger_entries": entries,
                "tampered_ledger_stops_training": fail_closed}
    summary = (f"ran {trained} of 40 requested rounds, spent eps {spent:.2f} of budget {privacy.epsilon_budget:g}"
               + (f", refused round {refused_at} before training" if refused_at else ", never refused")
               + ("; tampered ledger stops training" if fail_closed else ""))
    return CheckResult(passed, summary, evidence)
