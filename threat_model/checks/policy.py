"""Threat checks on what the institution decides and records: T13 a coordinator weakens the privacy settings,
T14 concurrent runs outspend the budget, T15 un-noised statistics leave the institution, T16 a forged global
adapter is loaded, T17 the audit log is edited, T18 a round is re-run with other participants."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

from fedse_threat_model.harness import CheckResult, ProtectionSettings, check, rounded


def _experiment(seed: int = 0, **privacy):
    from fedse_secure.config import ExperimentConfig

    return ExperimentConfig.model_validate({
        "name": "threat", "seed": seed, "model": {"name_or_path": "tiny-llama"},
        "clients": [{"name": n, "env": "maze", "seed_demos": 2} for n in ("clinic-a", "clinic-b", "clinic-c")],
        "federation": {"secure_aggregation": {"backend": "masking", **privacy.pop("secure_aggregation", {})}},
        "privacy": {"mode": "dp-sgd", "noise_multiplier": 1.0, "delta": 1e-5, **privacy},
    })


def _strict_policy(**approvals):
    from fedse_secure.policy import NodePolicy

    return NodePolicy.model_validate({
        "privacy": {"mechanisms": ["dp-sgd"], "min_noise_multiplier": 0.8, "max_delta": 1e-5, "max_epsilon": 8.0},
        "secure_aggregation": {"backends": ["masking"], "min_participants": 3, "min_threshold": 3},
        "approvals": approvals or {"experiments": "any"},
    })


# ======================================================================================================
# T13: the coordinator asks for weaker privacy than the institution's policy allows
# ======================================================================================================

@check
def coordinator_weakens_privacy(settings: ProtectionSettings) -> CheckResult:
    """The coordinator's experiment asks for no DP, delta 0.5, too little noise, a threshold below the minimum, or
    is not an approved experiment. Pass: the institution refuses each before any data is touched, naming the
    field; with the protection off the institution takes the coordinator's settings (as it did before node
    policies) and every request is accepted."""
    from fedse_secure.policy import NodePolicy, decide, experiment_hash

    approved = experiment_hash(_experiment().model_dump_json())
    attacks = {
        "no DP": (_experiment(mode="none"), "privacy.mode"),
        "delta 0.5": (_experiment(delta=0.5), "privacy.delta"),
        "noise 0.3": (_experiment(noise_multiplier=0.3), "privacy.noise_multiplier"),
        # The coordinator claims no institution colludes, which is what makes t = 2 of 3 pass its own validation.
        "threshold 2 of 3": (_experiment(secure_aggregation={"threshold": 2, "colluder_fraction": 0.0}),
                             "federation.secure_aggregation.threshold"),
        "unapproved experiment": (_experiment(seed=7), "experiment"),
    }
    outcomes = {}
    for name, (exp, field) in attacks.items():
        policy = _strict_policy(experiments=[approved]) if settings.on("policy") else NodePolicy.open()
        decision = decide(policy, exp, "clinic-a")
        outcomes[name] = {"refused": not decision.accepted,
                          "names_field": any(v.field == field for v in decision.violations),
                          "epsilon_budget_used": None if decision.effective is None
                          else decision.effective.privacy.epsilon_budget}
    passed = all(o["refused"] and o["names_field"] for o in outcomes.values())
    refused = sum(o["refused"] for o in outcomes.values())
    summary = f"{refused}/{len(attacks)} weakened requests refused before any data was touched, each naming its field"
    return CheckResult(passed, summary, {"attacks": outcomes, "policy": settings.on("policy")})


# ======================================================================================================
# T14: several runs on one ledger race past the budget
# ======================================================================================================

@check
def concurrent_budget_overspend(settings: ProtectionSettings) -> CheckResult:
    """Three runs of one institution start together on one ledger with room for one round. Pass: exactly one
    trains; the others see its spend and are refused before training (the check, the training and the append
    happen under the ledger's lock). Off: each checks the budget, then trains, then appends, and all three pass
    the check before any appends."""
    import numpy as np

    from fedse_secure.config import PrivacyConfig
    from fedse_secure.privacy import BudgetExceededError, client_event, epsilon
    from fedse_secure.privacy.mechanisms import MECHANISMS, ReleaseTerms

    base = PrivacyConfig(mode="client-dp", noise_multiplier=1.0)
    one, two = (epsilon([client_event(base, 3)] * k, base.delta) for k in (1, 2))
    privacy = base.model_copy(update={"epsilon_budget": (one + two) / 2})
    with tempfile.TemporaryDirectory(prefix="fedse-threat-race-") as tmp:
        ledger = Path(tmp) / "ledger.jsonl"
        start, outcomes = threading.Barrier(3), []

        def run() -> None:
            mech = MECHANISMS.get("client-dp")(privacy, ledger, "clinic", ReleaseTerms(3))
            start.wait()
            try:
                if settings.on("ledger-lock"):
                    with mech.round(1):
                        time.sleep(0.3)  # training
                        mech.release(1, np.zeros(8))
                else:
                    mech.ensure_affordable(mech.project(privacy, None, 0))
                    time.sleep(0.3)
                    mech.release(1, np.zeros(8))
                outcomes.append("trained")
            except BudgetExceededError:
                outcomes.append("refused")

        threads = [threading.Thread(target=run) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        from fedse_secure.privacy import PrivacyLedger

        spent = epsilon(PrivacyLedger(ledger).events(), privacy.delta)
    trained = outcomes.count("trained")
    passed = trained == 1 and spent <= privacy.epsilon_budget
    evidence = {"runs": 3, "budget_epsilon": rounded(privacy.epsilon_budget), "trained": trained,
                "refused": outcomes.count("refused"), "epsilon_spent": rounded(spent)}
    summary = f"3 concurrent runs, room for 1: {trained} trained, spent {spent:.2f} of {privacy.epsilon_budget:.2f}"
    return CheckResult(passed, summary, evidence)


# ======================================================================================================
# T15: statistics computed from private data leave without DP
# ======================================================================================================

def _round_report(records: int, batch: int) -> dict:
    """A DP-SGD institution's round report, as ``Institution.local_round`` and the mechanism build it."""
    return {
        "env": "maze", "payload_values": 16384,
        "explore": {"episodes": 8, "successes": 5, "success_rate": 0.625, "agent_steps": 80, "generated_tokens": 900,
                    "kept": 5, "added_to_buffer": 5, "buffer_size": records},
        "train": {"examples": records, "steps": 2 * records // batch, "loss": 0.731},
        "privacy": {"mechanism": "dp-sgd", "private": True, "epsilon_spent": 3.41, "delta": 1e-5,
                    "accountant": "rdp", "neighbouring": "add-remove", "ledger_head": "ab" * 32,
                    "noise_multiplier": 1.0, "sample_rate": batch / records},
        "timing": {"explore_s": 12.5, "train_s": 40.1},
    }


@check
def unnoised_statistics_leave(settings: ProtectionSettings) -> CheckResult:
    """The coordinator reads the institution's round report and evaluation. Pass: nothing computed from private
    data without DP reaches it (the strict policy allows none), so it cannot read off the record count that an
    add/remove-one guarantee keeps private. Off: the report leaves as computed; the record count falls out of
    the sample rate, the buffer size or the example count."""
    from fedse_secure.policy.exports import CATALOGUE, filter_evaluation, filter_round_report

    records, batch = 44, 4
    report = _round_report(records, batch)
    evaluation = {"env": "maze", "test_tasks": 20, "successes": 7, "success_rate": 0.35, "seconds": 30.0,
                  "agent_steps": 200}
    if settings.on("export-filter"):
        sent = filter_round_report(report, [])
        evaluation_sent = None  # the strict policy keeps evaluations inside (the endpoint refuses to evaluate)
    else:
        sent, evaluation_sent = report, filter_evaluation(evaluation, sorted(CATALOGUE))

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    leaked = sorted(name for name, _ in flat(sent) if name in CATALOGUE)
    values = dict(flat(sent))
    recovered = None
    if "privacy.sample_rate" in values:
        recovered = round(batch / values["privacy.sample_rate"])
    elif "explore.buffer_size" in values or "train.examples" in values:
        recovered = values.get("explore.buffer_size", values.get("train.examples"))
    passed = not leaked and recovered is None and evaluation_sent is None
    evidence = {"private_statistics_sent": len(leaked), "names": leaked[:8], "record_count_recovered": recovered,
                "true_record_count": records, "withheld": len(sent.get("withheld", []))}
    summary = (f"{len(leaked)} private statistics reached the coordinator"
               + (f"; it recovers the record count {recovered}" if recovered else "; the record count stays inside"))
    return CheckResult(passed, summary, evidence)


# ======================================================================================================
# T16: a forged, tampered or replayed global adapter is loaded
# ======================================================================================================

@check
def forged_global_adapter(settings: ProtectionSettings) -> CheckResult:
    """Someone between the coordinator and the institution (or a rogue coordinator process without the
    coordinator's key) sends a global adapter of its own, alters the real one, or replays an earlier round's.
    Pass: the institution loads only an adapter whose coordinator signature verifies for that round and run.
    Off: it loads whatever arrives."""
    from collections import OrderedDict

    import torch

    from fedse_secure.audit.attest import AdapterSigner
    from fedse_secure.federation.endpoint import InstitutionEndpoint, Refused
    from fedse_secure.federation.wire import StageRequest, run_key
    from fedse_secure.models.adapters import state_to_bytes
    from fedse_secure.policy import NodePolicy, decide
    from fedse_secure.secagg.masking.identity import IdentityKey

    exp = _experiment()
    text = exp.model_dump_json()
    key = run_key(text)
    coordinator, impostor = IdentityKey.generate(), IdentityKey.generate()
    signer, forger = AdapterSigner(coordinator, text), AdapterSigner(impostor, text)
    g = torch.Generator().manual_seed(settings.seed)
    state = OrderedDict((f"layer{i}.lora_A.weight", torch.randn(8, 16, generator=g)) for i in range(3))
    policy = NodePolicy.open()
    if not settings.on("adapter-signature"):
        policy.adapters.require_signature = False
    endpoint = InstitutionEndpoint(None, exp.federation.backend(), key=key, decision=decide(policy, exp, "clinic-a"),
                                   coordinator_key=coordinator.public_bytes() if settings.on("adapter-signature")
                                   else None)

    def request(st, signed, round_id=3):
        data, order = state_to_bytes(st)
        blobs = {"global_state": data, "global_state_keys": order}
        if signed is not None:
            blobs["global_state_signature"] = json.dumps(signed).encode()
        return StageRequest("advertise_keys", round_id, key, text, train=True, blobs=blobs)

    altered = OrderedDict((k, v.clone()) for k, v in state.items())
    altered["layer0.lora_A.weight"][0, 0] += 0.5
    attacks = {
        "altered in transit": request(altered, signer.sign(2, state)),
        "signed by another key": request(altered, forger.sign(2, altered)),
        "unsigned": request(altered, None),
        "earlier round replayed": request(state, signer.sign(1, state)),
    }
    loaded = {}
    for name, req in attacks.items():
        try:
            endpoint._global_state(req, adapter_round=2)
            loaded[name] = True
        except Refused:
            loaded[name] = False
    genuine = endpoint._global_state(request(state, signer.sign(2, state)), adapter_round=2) is not None
    passed = genuine and not any(loaded.values())
    summary = (f"{sum(not v for v in loaded.values())}/{len(attacks)} forged adapters refused; the genuine one "
               f"{'loads' if genuine else 'does not load'}")
    return CheckResult(passed, summary, {"loaded": loaded, "genuine_loads": genuine})


# ======================================================================================================
# T17: the audit log is edited to hide what left
# ======================================================================================================

@check
def audit_log_tampering(settings: ProtectionSettings) -> CheckResult:
    """The institution's operator edits its audit log to hide an export (fewer bytes, a deleted message, the last
    rounds cut off). Pass: `AuditLog.verify` detects every edit. Off: the log is read as plain JSON lines and the
    edited history is believed."""
    from fedse_secure.audit import AuditLog
    from fedse_secure.audit.chain import canonical, record_hash

    with tempfile.TemporaryDirectory(prefix="fedse-threat-audit-") as tmp:
        log = AuditLog(Path(tmp) / "genuine" / "audit.jsonl")
        for r in range(1, 5):
            log.record("export", "clinic-a", round=r, stage="advertise_keys", bytes=2000 + r, sha256="ab" * 32)
        lines = log.path.read_text().splitlines()
        true_bytes = sum(json.loads(x)["data"]["bytes"] for x in lines)

        def variant(name: str, new_lines: list[str]) -> Path:
            folder = Path(tmp) / name
            folder.mkdir()
            (folder / "audit.jsonl").write_text("".join(x + "\n" for x in new_lines))
            (folder / "audit.jsonl.head").write_text(log.head_path.read_text())
            return folder / "audit.jsonl"

        rec = json.loads(lines[1])
        rec["data"]["bytes"] = 1
        rehashed = dict(rec, hash=record_hash(rec))
        attacks = {
            "understate bytes": variant("edit", [lines[0], canonical(rec).decode(), *lines[2:]]),
            "understate and rehash": variant("rehash", [lines[0], canonical(rehashed).decode(), *lines[2:]]),
            "delete an export": variant("delete", [lines[0], *lines[2:]]),
            "cut the last rounds": variant("truncate", lines[:2]),
        }
        outcomes = {}
        for name, path in attacks.items():
            claimed = sum(json.loads(x)["data"]["bytes"] for x in path.read_text().splitlines())
            detected = not AuditLog(path).verify().ok if settings.on("audit-chain") else False
            outcomes[name] = {"detected": detected, "claimed_bytes": claimed}
    passed = all(o["detected"] for o in outcomes.values())
    summary = (f"{sum(o['detected'] for o in outcomes.values())}/{len(attacks)} audit-log edits detected "
               f"(true bytes out {true_bytes}; edits claim as few as "
               f"{min(o['claimed_bytes'] for o in outcomes.values())})")
    return CheckResult(passed, summary, {"true_bytes": true_bytes, "attacks": outcomes})


# ======================================================================================================
# T18: the coordinator re-runs a round with other participants and subtracts the sums
# ======================================================================================================

class _DeterministicInstitution:
    """An institution whose local round, like the real one (its seeds follow the round id), gives the same
    update every time the same round is asked for; a seeded vector stands in for the trained adapter."""

    def __init__(self, experiment, name: str, size: int, seed: int) -> None:
        self.experiment, self.name, self.size, self.seed = experiment, name, size, seed
        self.rounds_trained = 0

    def local_round(self, round_id, state, progress):
        import numpy as np

        from fedse_secure.federation.institution import LocalRound, derive_seed

        self.rounds_trained += 1
        rng = np.random.default_rng(derive_seed(self.seed, self.name, "train", round_id))
        return LocalRound(rng.normal(0.0, 0.05, self.size), {"privacy": {"mechanism": "none", "private": False}})


@check
def round_rerun_subtraction(settings: ProtectionSettings) -> CheckResult:
    """The coordinator runs round 1 with four institutions, then re-runs round 1 on the same adapter four times,
    each time without one of them, and subtracts each re-run's sum from the first: S(all) - S(all but i) is
    institution i's update, with no colluder and under any secure aggregation. Pass: an institution answers
    the input stage of a round of a run at most once (remembered in memory and in its audit log), so each
    re-run is refused before training and releases nothing. Off: the institutions' policies allow a re-run
    (``secure_aggregation.one_input_per_round: false``, the simulation's open default) and every update is
    recovered."""
    from collections import OrderedDict

    import numpy as np
    import torch

    from fedse_secure.audit import AuditLog
    from fedse_secure.config import ExperimentConfig
    from fedse_secure.federation.endpoint import InstitutionEndpoint
    from fedse_secure.federation.wire import StageRequest, run_key
    from fedse_secure.models.adapters import state_to_bytes
    from fedse_secure.policy import NodePolicy, decide
    from fedse_secure.secagg.base import RoundAbortedError
    from fedse_secure.secagg.driver import drive
    from fedse_secure.secagg.masking.identity import IdentityKey, PublicKeyRegistry

    names, size = ["clinic-a", "clinic-b", "clinic-c", "clinic-d"], 512
    exp = ExperimentConfig.model_validate({
        "name": "threat-rerun", "seed": settings.seed, "model": {"name_or_path": "tiny-llama"},
        "clients": [{"name": n, "env": "maze", "seed_demos": 2} for n in names],
        "federation": {"secure_aggregation": {"backend": "masking", "colluder_fraction": 0.0}},
        "privacy": {"mode": "none"},
    })
    text, backend = exp.model_dump_json(), exp.federation.backend()
    key = run_key(text)
    ids = {n: IdentityKey.generate() for n in names}
    registry = PublicKeyRegistry.from_identities(ids)
    policy = NodePolicy.open()
    policy.adapters.require_signature = False  # T16's concern; this check is about what the institution sends
    policy.secure_aggregation.one_input_per_round = settings.on("one-input-per-round")
    institutions = {n: _DeterministicInstitution(exp, n, size, settings.seed) for n in names}
    adapter, order = state_to_bytes(OrderedDict(w=torch.zeros(4)))

    with tempfile.TemporaryDirectory(prefix="fedse-threat-rerun-") as tmp:
        def endpoint(name):
            audit = AuditLog(Path(tmp) / name / "audit.jsonl")
            return InstitutionEndpoint(institutions[name], backend, ids[name], registry, key=key,
                                       decision=decide(policy, exp, name, experiment_json=text), audit=audit)

        endpoints = {n: endpoint(n) for n in names}

        def attempt(roster):
            server, refused = backend.server(1, roster, size, registry), set()

            def exchange(stage, requests):
                train, out = stage == backend.stages[0], {}
                for name, data in requests.items():
                    blobs = {"request": data}
                    if train:
                        blobs.update(global_state=adapter, global_state_keys=order)
                    reply = endpoints[name].handle(StageRequest(stage, 1, key, text if train else "", train=train,
                                                                blobs=blobs))
                    if reply.error:
                        refused.add(name)
                    else:
                        out[name] = reply.blobs["reply"]
                return out

            try:
                return drive(server, exchange).total, refused
            except RoundAbortedError:
                return None, refused

        total, _ = attempt(names)
        trained = sum(i.rounds_trained for i in institutions.values())
        recovered, refusals, released = {}, 0, 0
        for left_out in names:
            rerun, refused = attempt([n for n in names if n != left_out])
            refusals += len(refused)
            if rerun is not None:
                released += 1
                truth = institutions[left_out].local_round(1, None, None).payload
                institutions[left_out].rounds_trained -= 1
                recovered[left_out] = rounded(float(np.abs(total - rerun - truth).max()), 9)
        retrained = sum(i.rounds_trained for i in institutions.values()) - trained
    exact = sum(err < 1e-4 for err in recovered.values())
    passed = total is not None and released == 0 and exact == 0 and retrained == 0
    evidence = {"institutions": len(names), "reruns": len(names), "reruns_released": released,
                "refusals": refusals, "local_rounds_in_reruns": retrained, "updates_recovered": exact,
                "max_abs_error_of_recovery": recovered}
    summary = (f"{released}/{len(names)} re-runs of round 1 released a sum; {exact} of {len(names)} updates "
               f"recovered by subtraction ({refusals} refusals before training)")
    return CheckResult(passed, summary, evidence)
