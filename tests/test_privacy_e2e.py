"""End to end: `fedse simulate` with DP-SGD and a budget too small for the configured rounds stops before the
round that would exceed it, with every institution's ledger intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedse_secure.privacy import DpEvent, PrivacyLedger, epsilon

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


@pytest.mark.slow
def test_simulate_stops_before_the_round_that_would_exceed_the_budget(tmp_path):
    from fedse_cli.main import app

    # expected_batch_size above any buffer size makes q = 1 and one step per round (epochs_per_round: 1), so each
    # round is exactly one Gaussian release per institution, whatever exploration adds to the buffers.
    sigma, delta = 1.0, 1e-5
    one = DpEvent("gaussian", "record", sigma, 1.0, 1, 1.0)
    after_two, after_three = epsilon([one] * 2, delta), epsilon([one] * 3, delta)
    budget = (after_two + after_three) / 2
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "simulate", str(SMOKE), "--out", str(out), "--quiet",
        "--set", "federation.rounds=3",
        "--set", "privacy.mode=dp-sgd",
        "--set", f"privacy.noise_multiplier={sigma}",
        "--set", "privacy.expected_batch_size=64",
        "--set", f"privacy.epsilon_budget={budget}",
        "--set", f"privacy.delta={delta}",
        "--set", "training.epochs_per_round=1",
        "--set", "evaluation.every_round=false",
    ])
    assert result.exit_code == 3, result.output
    assert "stopped before round 3" in result.output
    assert "refused before training" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "budget_exhausted" and summary["rounds_completed"] == 2

    ledgers = sorted(out.glob("institutions/*/privacy_ledger.jsonl"))
    assert len(ledgers) == 3
    for path in ledgers:
        ledger = PrivacyLedger(path)
        report = ledger.verify()
        assert report.ok and report.entries == 2 and report.sealed_entries == 2, report.summary()
        entries = ledger.entries()
        assert [e.round for e in entries] == [1, 2]
        assert all(e.event == DpEvent("gaussian", "record", sigma, 1.0, 1, 1.0, population=e.event.population)
                   for e in entries)
        assert epsilon(ledger.events(), delta) == pytest.approx(after_two)
        assert epsilon(ledger.events(), delta) <= budget

    verify = CliRunner().invoke(app, ["privacy", "verify", str(ledgers[0]), "--no-cross-check"])
    assert verify.exit_code == 0, verify.output
