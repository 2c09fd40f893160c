"""The checks pass with every protection on, and each protection's removal makes its checks fail."""

from __future__ import annotations

import pytest

from fedse_threat_model.harness import PROTECTIONS, ProtectionSettings, UnknownProtectionError, run_check
from fedse_threat_model.registry import load_threats

THREATS = load_threats()
PAIRS = [(t, p) for t in THREATS for p in t.fails_without]


@pytest.mark.parametrize("threat", THREATS, ids=[t.id for t in THREATS])
def test_every_check_passes_with_all_protections_on(threat):
    result = run_check(threat.check, ProtectionSettings())
    assert result.passed, f"{threat.id} {threat.check}: {result.summary}\n{result.evidence}"
    assert result.evidence, f"{threat.id} reports no evidence numbers"


@pytest.mark.parametrize("threat,protection", PAIRS, ids=[f"{t.id}-without-{p}" for t, p in PAIRS])
def test_switching_a_protection_off_makes_its_checks_fail(threat, protection):
    result = run_check(threat.check, ProtectionSettings.without(protection))
    assert not result.passed, f"{threat.id} still passes with {protection} off: {result.summary}"
    assert result.disabled == [protection]


def test_the_attacks_are_strong_enough_to_matter():
    """A pass must not come from a weak attack: the same attack succeeds on the unprotected data."""
    inv = run_check("update_inversion").evidence
    assert inv["precision_on_true_update_control"] >= 0.8
    assert inv["precision_on_coordinator_view"] <= inv["limit"]
    mia = run_check("membership_inference").evidence
    assert mia["advantage_non_dp_model"] > mia["advantage_bound"] > mia["advantage_dp_model"]
    assert mia["dp_epsilon_accounted"] <= mia["claimed_epsilon"] * 1.01
    lying = run_check("lying_about_dropouts").evidence
    assert lying["mask_key_shares_obtained"] >= lying["threshold"] and lying["seed_shares_obtained"] == 0


def test_unknown_protection_names_are_refused_with_the_choices():
    with pytest.raises(UnknownProtectionError, match="choose from masking"):
        ProtectionSettings.without("encryption")
    assert set(PROTECTIONS) >= {"masking", "signatures", "aead", "dp", "ledger-chain"}
