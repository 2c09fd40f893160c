"""Ledger integrity and honest accounting: δ and the neighbouring relation recorded with every event, any
earlier recorded head accepted as a prefix, reports that never pick a larger δ, one-pass curves equal to
recomposing every prefix, replace-one accounted by PLD, non-private runs labelled, CSPRNG noise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedse_secure.privacy import DpEvent, PrivacyLedger, epsilon, get_accountant
from fedse_secure.privacy.report import ReportError, build_report


def _event(n: int, sigma: float = 1.0, relation: str = "add-remove") -> DpEvent:
    return DpEvent("subsampled_gaussian", "record", sigma, 4 / n, n // 2, 1.0, n, neighbouring=relation)


def _ledger(tmp_path, rounds: int = 5, delta: float = 1e-5, relation: str = "add-remove") -> PrivacyLedger:
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")
    for r in range(1, rounds + 1):
        ledger.append(_event(20 + 4 * r, relation=relation), r, "clinic", delta)
    return ledger


def test_every_line_carries_delta_relation_and_a_salt(tmp_path):
    ledger = _ledger(tmp_path, 2)
    lines = [json.loads(x) for x in ledger.path.read_text().splitlines()]
    assert [x["v"] for x in lines] == [2, 2] and {x["delta"] for x in lines} == {1e-5}
    assert {x["event"]["neighbouring"] for x in lines} == {"add-remove"}
    assert len({x["salt"] for x in lines}) == 2 and all(len(x["salt"]) == 32 for x in lines)
    assert ledger.recorded_delta() == 1e-5


def test_any_earlier_recorded_head_is_accepted_as_a_prefix(tmp_path):
    ledger = _ledger(tmp_path, 3)
    heads = [e.hash for e in ledger.entries()]
    report = ledger.verify(expected_heads=heads)
    assert report.ok and report.matched_heads == {heads[0]: 1, heads[1]: 2, heads[2]: 3}
    ledger.append(_event(40), 4, "clinic", 1e-5)
    assert ledger.verify(expected_head=heads[0]).ok  # an old head still heads a prefix
    bad = ledger.verify(expected_heads=[heads[1], "cd" * 32])
    assert not bad.ok and "is not the head of any prefix" in bad.problem


def test_a_ledger_deleted_and_restarted_does_not_hold_the_recorded_heads(tmp_path):
    ledger = _ledger(tmp_path, 3)
    recorded = ledger.head_hash()  # as the coordinator stored it in round 3's attestation
    ledger.path.unlink()
    ledger.head_path.unlink()
    fresh = _ledger(tmp_path, 3)  # same events, a "reset" budget: different salts, times, hashes
    assert not fresh.verify(expected_heads=[recorded]).ok


def test_reports_account_at_the_recorded_delta_and_refuse_a_larger_one(tmp_path):
    ledger = _ledger(tmp_path, 8)
    report = build_report(ledger, accountants=["rdp"])
    assert report.delta == 1e-5
    assert report.total["rdp"] == pytest.approx(epsilon(ledger.events(), 1e-5))
    with pytest.raises(ReportError, match="larger than the delta=1e-05 this ledger's events were accounted at"):
        build_report(ledger, 0.5)  # the trick: the same ledger reported at delta 0.5 gave epsilon 0.0
    assert build_report(ledger, 1e-7, accountants=["rdp"]).total["rdp"] > report.total["rdp"]


def test_legacy_version_1_lines_are_still_read(tmp_path):
    from fedse_secure.audit.chain import GENESIS_HASH, canonical, record_hash

    record = {"v": 1, "seq": 1, "round": 0, "institution": "old", "time": "2026-01-01T00:00:00+00:00",
              "event": {k: v for k, v in _event(40).to_dict().items() if k != "neighbouring"},
              "prev_hash": GENESIS_HASH}
    record["hash"] = record_hash(record)
    path = tmp_path / "old.jsonl"
    path.write_text(canonical(record).decode() + "\n")
    (tmp_path / "old.jsonl.head").write_text(json.dumps({"v": 1, "entries": 1, "head_hash": record["hash"],
                                                         "updated": ""}))
    ledger = PrivacyLedger(path)
    (entry,) = ledger.entries()
    assert entry.delta is None and entry.event.neighbouring == "add-remove"
    assert build_report(ledger, accountants=["rdp"]).delta == 1e-5  # no δ recorded: the conventional default


@pytest.mark.parametrize("accountant", ["rdp", "prv", "pld"])
def test_one_pass_curve_equals_recomposing_every_prefix(accountant):
    rounds = [[_event(20 + 4 * r)] for r in range(1, 6)]
    acc = get_accountant(accountant)
    curve = acc.curve(rounds, 1e-5)
    prefixes = [acc.epsilon([e for rr in rounds[: i + 1] for e in rr], 1e-5) for i in range(len(rounds))]
    tolerance = 1e-9 if accountant == "rdp" else 0.02  # PRV: within its eps_error; PLD: its discretisation
    assert curve == pytest.approx(prefixes, abs=tolerance)
    assert all(a < b for a, b in zip(curve, curve[1:]))


def test_the_prv_curve_equals_opacus_composing_every_prefix():
    from opacus.accountants import PRVAccountant

    from fedse_secure.privacy.accountants import opacus_history

    rounds = [[_event(20 + 4 * r)] for r in range(1, 4)] + [[DpEvent("gaussian", "client", 1.5, 1.0, 1, 1.0)]]
    ours = get_accountant("prv").curve(rounds, 1e-5)
    reference, so_far = [], []
    for events in rounds:
        so_far += events
        acc = PRVAccountant()
        acc.history = opacus_history(so_far)
        reference.append(acc.get_epsilon(delta=1e-5))
    assert ours == pytest.approx(reference, abs=1e-5)


def test_replace_one_costs_more_and_only_pld_accounts_for_it():
    from fedse_secure.privacy import AccountingError

    add = [_event(40)] * 3
    replace = [_event(40, relation="replace-one")] * 3
    ratio = epsilon(replace, 1e-5, "pld") / epsilon(add, 1e-5, "pld")
    assert 1.2 < ratio < 2.0
    assert epsilon(add, 1e-5, "pld") == pytest.approx(epsilon(add, 1e-5, "prv"), rel=0.02)
    for name in ("rdp", "prv"):
        with pytest.raises(AccountingError, match="accounts add-remove"):
            epsilon(replace, 1e-5, name)
    # A composition with any replace-one event is accounted as replace-one (the conservative reading).
    assert epsilon([*add[:2], replace[0]], 1e-5, "pld") == pytest.approx(epsilon(replace, 1e-5, "pld"))


def test_a_noiseless_run_is_labelled_non_private_and_reported_as_strict_json(tmp_path):
    from fedse_secure.config import PrivacyConfig
    from fedse_secure.privacy.mechanisms import MECHANISMS, ReleaseTerms

    privacy = PrivacyConfig(mode="client-dp", noise_multiplier=0.0)
    mech = MECHANISMS.get("client-dp")(privacy, tmp_path / "l.jsonl", "clinic", ReleaseTerms(3))
    with mech.round(1):
        mech.release(1, np.ones(4))
    report = mech.report()
    assert report["private"] is False and report["epsilon_spent"] is None and "noise_multiplier 0" in report["non_private"]
    json.dumps(report, allow_nan=False)
    built = build_report(mech.ledger())
    assert built.non_private_from_round == 1 and math.isinf(built.total["rdp"])
    data = json.loads(json.dumps(built.to_dict(), allow_nan=False))
    assert data["private"] is False and data["total"]["rdp"] is None


def test_secure_noise_is_gaussian_and_unpredictable():
    from fedse_secure.privacy.noise import SecureRandom

    a, b = SecureRandom(), SecureRandom()
    x = a.normal(2.0, (200_000,))
    assert x.std() == pytest.approx(2.0, rel=0.01) and abs(x.mean()) < 0.02
    assert abs(float(np.mean(x ** 3)) / 8) < 0.05 and float(np.mean(x ** 4)) / 16 == pytest.approx(3.0, rel=0.05)
    assert not np.array_equal(a.normal(1.0, 8), b.normal(1.0, 8))  # two generators never share a stream
    mask = a.poisson_mask(100_000, 0.1)
    assert mask.mean() == pytest.approx(0.1, abs=0.005)


def test_dp_sgd_draws_its_noise_and_samples_from_the_secure_generator(monkeypatch):
    from fedse_secure.privacy import dpsgd, noise

    calls = {"normal": 0, "mask": 0}
    real_normal, real_mask = noise.SecureRandom.normal, noise.SecureRandom.poisson_mask

    def normal(self, std, shape):
        calls["normal"] += 1
        return real_normal(self, std, shape)

    def mask(self, n, rate):
        calls["mask"] += 1
        return real_mask(self, n, rate)

    monkeypatch.setattr(noise.SecureRandom, "normal", normal)
    monkeypatch.setattr(noise.SecureRandom, "poisson_mask", mask)
    from fedse_secure.config import PrivacyConfig, TrainingConfig
    from fedse_secure.models import load_model_and_tokenizer
    from peft import LoraConfig, get_peft_model

    tiny = load_model_and_tokenizer("tiny-llama")
    model = get_peft_model(tiny.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.0))

    class Ex:
        def __init__(self, ids):
            self.input_ids, self.labels = ids, [-100] * 3 + ids[3:]

    examples = [Ex(list(range(5 + i, 17 + i))) for i in range(8)]
    result = dpsgd.train_dp_sgd(model, examples, TrainingConfig(epochs_per_round=1, max_steps_per_round=2),
                                PrivacyConfig(mode="dp-sgd", expected_batch_size=2), tiny.tokenizer.pad_token_id, 0)
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert result.steps == 2 and calls["mask"] == 2 and calls["normal"] == 2 * trainable


def test_the_round_order_is_checked_before_the_round_touches_anything(tmp_path):
    from fedse_secure.config import PrivacyConfig
    from fedse_secure.privacy import LedgerError
    from fedse_secure.privacy.mechanisms import MECHANISMS, ReleaseTerms

    mech = MECHANISMS.get("client-dp")(PrivacyConfig(mode="client-dp"), tmp_path / "l.jsonl", "clinic",
                                       ReleaseTerms(3))
    with mech.round(5):
        mech.release(5, np.zeros(4))
    touched = []
    with pytest.raises(LedgerError, match="round 3 is before the last recorded round 5"):
        with mech.round(3):  # a coordinator replaying an old round
            touched.append(True)
    assert touched == [] and len(mech.ledger().entries()) == 1
