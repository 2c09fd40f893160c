"""`fedse privacy report|verify|plan` (a thin shell over fedse_secure.privacy)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedse_cli.main import app
from fedse_secure.privacy import DpEvent, PrivacyLedger, cumulative_epsilon, epsilon

runner = CliRunner()


def _ledger(tmp_path, rounds: int = 3) -> PrivacyLedger:
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")
    for r in range(1, rounds + 1):
        n = 10 * r  # the buffer grows, so the sample rate falls
        ledger.append(DpEvent("subsampled_gaussian", "record", 1.2, 4 / n, round(n / 4), 1.0, n), round=r,
                      institution="clinic", delta=1e-5)
    return ledger


def _invoke(*args: str):
    result = runner.invoke(app, ["privacy", *args])
    return result


def test_report_json_and_png(tmp_path):
    ledger = _ledger(tmp_path)
    png = tmp_path / "eps.png"
    result = _invoke("report", str(ledger.path), "--budget", "20", "--png", str(png), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    events = [[e] for e in ledger.events()]
    assert [r["round"] for r in data["rows"]] == [1, 2, 3]
    assert data["accountants"] == ["pld", "prv", "rdp"]
    cumulative = {a: [r["cumulative"][a] for r in data["rows"]] for a in data["accountants"]}
    assert cumulative["rdp"] == pytest.approx(cumulative_epsilon(events, 1e-5, "rdp"))
    assert data["total"]["prv"] == pytest.approx(epsilon(ledger.events(), 1e-5, "prv"))
    assert all(a < b for a, b in zip(cumulative["prv"], cumulative["prv"][1:]))
    assert data["total"]["prv"] < data["total"]["rdp"]
    assert data["remaining"]["rdp"] == pytest.approx(20 - data["total"]["rdp"])
    assert data["institution"] == "clinic"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_table_and_default_png(tmp_path):
    ledger = _ledger(tmp_path, 2)
    result = _invoke("report", str(ledger.path))
    assert result.exit_code == 0, result.output
    assert "total ε" in result.output and "budget: none configured" in result.output
    assert (tmp_path / "privacy_ledger.jsonl.epsilon.png").is_file()


def test_report_refuses_a_tampered_ledger(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.path.write_text("".join(ledger.path.read_text().splitlines(keepends=True)[:-1]))
    result = _invoke("report", str(ledger.path))
    assert result.exit_code == 1
    assert "line 3" in result.output and "verify" in result.output


def test_verify_ok_recomputes_epsilon_and_cross_checks(tmp_path):
    ledger = _ledger(tmp_path)
    result = _invoke("verify", str(ledger.path), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["ok"] and data["verification"]["entries"] == 3
    assert data["epsilon"]["rdp"] == pytest.approx(epsilon(ledger.events(), 1e-5, "rdp"))
    assert data["epsilon_google_rdp"] == pytest.approx(data["epsilon"]["rdp"], rel=0.01)
    assert data["cross_check_ok"] is True
    text = _invoke("verify", str(ledger.path), "--expect-head", ledger.head_hash())
    assert text.exit_code == 0 and "OK" in text.output and "agrees" in text.output


@pytest.mark.parametrize("tamper", ["edit", "delete_middle", "delete_last"])
def test_verify_fails_and_names_the_line(tmp_path, tamper):
    ledger = _ledger(tmp_path)
    lines = ledger.path.read_text().splitlines(keepends=True)
    if tamper == "edit":
        lines[1] = lines[1].replace('"noise_multiplier":1.2', '"noise_multiplier":9.9')
        line = 2
    elif tamper == "delete_middle":
        del lines[1]
        line = 2
    else:
        del lines[-1]
        line = 3
    ledger.path.write_text("".join(lines))
    result = _invoke("verify", str(ledger.path), "--no-cross-check")
    assert result.exit_code == 1
    assert "FAILED" in result.output and f"line {line}" in result.output


def test_verify_with_a_wrong_external_head_fails(tmp_path):
    ledger = _ledger(tmp_path)
    result = _invoke("verify", str(ledger.path), "--expect-head", "ab" * 32, "--no-cross-check")
    assert result.exit_code == 1 and "externally recorded" in result.output


def test_plan_dp_sgd(tmp_path):
    result = _invoke("plan", "--target-epsilon", "8", "--rounds", "4", "--records", "100", "--epochs", "1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["sample_rate"] == pytest.approx(0.04) and data["steps_per_round"] == 25
    plans = data["accountants"]
    assert sorted(plans) == ["pld", "prv", "rdp"]
    for plan in plans.values():
        assert 0 < plan["noise_multiplier"] < 5
        assert plan["epsilon"] <= 8.0
    assert plans["prv"]["noise_multiplier"] <= plans["rdp"]["noise_multiplier"]


def test_plan_client_dp_after_a_ledger(tmp_path):
    ledger = _ledger(tmp_path, 1)
    result = _invoke("plan", "-e", "10", "-r", "3", "--mode", "client-dp", "--ledger", str(ledger.path), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["steps_per_round"] == 1 and data["sample_rate"] == 1.0 and data["already_spent_events"] == 1
    assert data["accountants"]["rdp"]["epsilon"] <= 10.0


def test_plan_errors_are_clear(tmp_path):
    result = _invoke("plan", "-e", "8", "-r", "3")
    assert result.exit_code == 2 and "--records is required" in result.output
    result = _invoke("plan", "-e", "8", "--records", "10")
    assert result.exit_code == 2 and "--rounds is required" in result.output
    result = _invoke("report", str(tmp_path / "missing.jsonl"))
    assert result.exit_code == 2 and "no such ledger" in result.output


def test_help_lists_the_commands():
    result = runner.invoke(app, ["privacy", "--help"])
    assert result.exit_code == 0
    for name in ("report", "verify", "plan"):
        assert name in result.output
